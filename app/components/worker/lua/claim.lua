-- claim: a worker takes one delivery of a job, or learns it must skip it.
-- KEYS[1] job hash   KEYS[2] held set of this worker instance   KEYS[3] events stream
-- ARGV[1] job id  ARGV[2] try (attempt this delivery is for)  ARGV[3] worker id  ARGV[4] now ms
-- ARGV[5] envelope JSON  ARGV[6] queue  ARGV[7] task  ARGV[8] worker instance (owner)
-- ARGV[9] engine  ARGV[10] events maxlen  ARGV[11] delivery token (unique per delivery handled)
-- Returns {1, attempt} to run, or {0, reason}: completed|failed|cancelled|running|stale.
-- A delivery runs only when the job waits (queued/delayed) for exactly this attempt, so a
-- duplicate delivery (engine redelivery racing a completion, taskiq's double read) is skipped.
-- The job.started event is written here, with the attempt count, so a crash cannot lose it.
local try = tonumber(ARGV[2])
local status = redis.call('HGET', KEYS[1], 'status')
if status then
  local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
  if status == 'running' and attempt == try and redis.call('HGET', KEYS[1], 'delivery') == ARGV[11] then
    return {1, try}  -- this very claim, retried after its reply was lost (a Redis restart)
  end
  if status ~= 'queued' and status ~= 'delayed' then
    return {0, status}
  end
  if attempt ~= try - 1 then
    return {0, 'stale'}
  end
  redis.call('HSET', KEYS[1], 'status', 'running', 'attempt', try, 'worker', ARGV[3], 'owner', ARGV[8],
    'started_at', ARGV[4], 'delivery', ARGV[11])
else
  -- No record (written behind the layer's back, or expired): run it, and record it now.
  redis.call('HSET', KEYS[1], 'status', 'running', 'attempt', try, 'queue', ARGV[6], 'task', ARGV[7],
    'envelope', ARGV[5], 'enqueued_at', ARGV[4], 'worker', ARGV[3], 'owner', ARGV[8], 'started_at', ARGV[4],
    'engine', ARGV[9], 'delivery', ARGV[11])
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*', 'type', 'job.started', 'ts', ARGV[4],
  'queue', ARGV[6], 'backend', ARGV[9], 'job_id', ARGV[1], 'task', ARGV[7], 'attempt', try,
  'worker_id', ARGV[3], 'duration_ms', '', 'error', '')
return {1, try}
