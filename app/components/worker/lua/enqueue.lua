-- enqueue: record a job and (optionally) schedule it, refusing a live duplicate id.
-- KEYS[1] job hash   KEYS[2] delayed zset of the queue   KEYS[3] events stream   KEYS[4] result key
-- ARGV[1] job id   ARGV[2] envelope JSON   ARGV[3] queue   ARGV[4] task
-- ARGV[5] now ms   ARGV[6] due ms (0: send now)   ARGV[7] events maxlen   ARGV[8] engine
-- Returns 1 when recorded, 0 when a job with that id is queued, delayed or running.
-- A finished job's id may be reused: its old record and result are replaced.
-- Returns 2 when this same envelope is already recorded (a retried call).
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'delayed' or status == 'running' then
  if redis.call('HGET', KEYS[1], 'envelope') == ARGV[2] then
    return 2  -- this very enqueue, retried after its reply was lost: already recorded
  end
  return 0
end
local due = tonumber(ARGV[6])
local new_status = 'queued'
if due > 0 then new_status = 'delayed' end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('HSET', KEYS[1], 'status', new_status, 'attempt', 0, 'queue', ARGV[3], 'task', ARGV[4],
  'envelope', ARGV[2], 'enqueued_at', ARGV[5], 'engine', ARGV[8])
if due > 0 then
  redis.call('ZADD', KEYS[2], due, ARGV[2])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'type', 'job.enqueued', 'ts', ARGV[5],
  'queue', ARGV[3], 'backend', ARGV[8], 'job_id', ARGV[1], 'task', ARGV[4], 'attempt', '0',
  'worker_id', '', 'duration_ms', '', 'error', '')
return 1
