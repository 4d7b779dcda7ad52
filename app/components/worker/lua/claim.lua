-- claim: a worker takes one delivery of a job, or learns it must skip it.
-- KEYS[1] job hash   KEYS[2] held set of this worker instance   KEYS[3] events stream
-- ARGV[1] job id  ARGV[2] try (attempt this delivery is for)  ARGV[3] worker id
-- ARGV[4] run token of the delivery's envelope  ARGV[5] queue  ARGV[6] task
-- ARGV[7] worker instance (owner)  ARGV[8] engine  ARGV[9] events maxlen
-- ARGV[10] delivery token (unique per delivery handled)   ARGV[11] queue key prefix '<prefix>:{<queue>}:'
-- ARGV[12] tags of the job ('k=v,...', '' when none)   ARGV[13] its priority   ARGV[14] its group
-- ARGV[15] its selector   ARGV[16] its task when that task has a rate limit, else ''
-- Returns {1, attempt} to run, or {0, reason}: completed|failed|cancelled|running|stale (another
-- attempt), otherrun (a message of an earlier job under this id), norecord (no job record: the
-- caller ends the delivery with StaleDelivery, see reject.lua), parked (the queue is paused or
-- routed: the job was put in its ready set to be admitted there, see routing/admit.py; the
-- caller acks the delivery).
-- A delivery runs only when the record exists, belongs to the delivery's run, and waits
-- (queued/delayed) for exactly this attempt, so a duplicate delivery (engine redelivery racing
-- a completion, taskiq's double read) or a stale message of a reused id is skipped.
-- The job.started event is written here, with the attempt count, so a crash cannot lose it.
-- started_at is Redis time (TIME), comparable across hosts.
local try = tonumber(ARGV[2])
local job = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'delivery', 'run')
local status = job[1]
if not status then
  return {0, 'norecord'}
end
if (job[4] or '') ~= ARGV[4] then
  return {0, 'otherrun'}
end
local attempt = tonumber(job[2] or '0')
if status == 'running' and attempt == try and job[3] == ARGV[10] then
  return {1, try}  -- this very claim, retried after its reply was lost (a Redis restart)
end
if status ~= 'queued' and status ~= 'delayed' then
  return {0, status}
end
if attempt ~= try - 1 then
  return {0, 'stale'}
end
local qp = ARGV[11]
local flags = redis.call('HMGET', qp .. 'route', 'paused', 'routed')
if flags[1] == '1' or flags[2] == '1' then
  -- A message that reached the engine before the queue was paused or routed: it waits in the
  -- ready set like the others, in order, instead of starting now.
  local envelope = redis.call('HGET', KEYS[1], 'envelope')
  local band, key = 1, 'ready:-'
  if ARGV[13] == 'high' then band = 0 end
  if ARGV[15] ~= '' then
    key = 'ready-sel:' .. ARGV[15]
    redis.call('SADD', qp .. 'selectors', ARGV[15])
  elseif ARGV[14] ~= '' then
    key = 'ready:' .. ARGV[14]
    redis.call('SADD', qp .. 'groups', ARGV[14])
  end
  if ARGV[16] ~= '' then
    key = key .. '|' .. ARGV[16]
    redis.call('SADD', qp .. 'limited', key)
  end
  redis.call('ZADD', qp .. key, band * 4398046511104 + redis.call('INCR', qp .. 'seq'), envelope)
  local wake = qp .. 'ready-wake'
  if ARGV[15] == '' then
    if ARGV[14] ~= '' then wake = wake .. ':' .. ARGV[14] else wake = wake .. ':-' end
  end
  redis.call('LPUSH', wake, 1)
  redis.call('LTRIM', wake, 0, 63)
  redis.call('PEXPIRE', wake, 60000)
  return {0, 'parked'}
end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'status', 'running', 'attempt', try, 'worker', ARGV[3], 'owner', ARGV[7],
  'started_at', now, 'delivery', ARGV[10])
redis.call('SADD', KEYS[2], ARGV[1])
local fields = {'type', 'job.started', 'ts', now, 'queue', ARGV[5], 'backend', ARGV[8], 'job_id', ARGV[1],
  'task', ARGV[6], 'attempt', try, 'worker_id', ARGV[3], 'duration_ms', '', 'error', ''}
if ARGV[12] ~= '' then
  table.insert(fields, 'tags')
  table.insert(fields, ARGV[12])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[9], '*', unpack(fields))
return {1, try}
