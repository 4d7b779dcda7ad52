-- cancel: end a waiting (queued or delayed) job as cancelled, with its result and event.
-- KEYS[1] job hash   KEYS[2] delayed zset of its queue   KEYS[3] result key   KEYS[4] events stream
-- ARGV[1] job id   ARGV[2] unused (was the caller's clock: the time is Redis's, TIME)
-- ARGV[3] keep seconds   ARGV[4] events maxlen   ARGV[5] reason
-- ARGV[6] queue key prefix '<prefix>:{<queue>}:' (its ready sets; '' to leave them)
-- Returns 1 when cancelled, 0 when the job is not waiting (unknown, running or finished).
-- A message already handed to the engine stays there; the worker skips it at claim.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'delayed' then
  return 0
end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local job = redis.call('HMGET', KEYS[1], 'envelope', 'queue', 'task', 'attempt', 'engine', 'enqueued_at')
if job[1] then
  redis.call('ZREM', KEYS[2], job[1])
  if ARGV[6] and ARGV[6] ~= '' then
    local ok, e = pcall(cjson.decode, job[1])
    if ok and type(e) == 'table' then
      local key = 'ready:-'
      if type(e.selector) == 'string' and e.selector ~= '' then
        key = 'ready-sel:' .. e.selector
      elseif type(e.group) == 'string' and e.group ~= '' then
        key = 'ready:' .. e.group
      end
      if e.limited == true and type(e.task) == 'string' then key = key .. '|' .. e.task end
      redis.call('ZREM', ARGV[6] .. key, job[1])
    end
  end
end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', now)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local record = cjson.encode({job_id = ARGV[1], queue = job[2], task = job[3], status = 'cancelled',
  attempts = tonumber(job[4] or '0'), engine = job[5], enqueued_at = tonumber(job[6] or '0'),
  finished_at = tonumber(now), error_type = 'Cancelled', error = ARGV[5]})
redis.call('SET', KEYS[3], record, 'EX', tonumber(ARGV[3]))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'type', 'job.failed', 'ts', now,
  'queue', job[2] or '', 'backend', job[5] or '', 'job_id', ARGV[1], 'task', job[3] or '',
  'attempt', job[4] or '0', 'worker_id', '', 'duration_ms', '0', 'error', 'Cancelled: ' .. ARGV[5])
return 1
