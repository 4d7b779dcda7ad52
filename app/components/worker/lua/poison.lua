-- poison: remove an entry of a delayed set that cannot be decoded, with a job.failed event, once.
-- KEYS[1] delayed zset   KEYS[2] events stream   KEYS[3] job hash ('' id: any key, unused)
-- KEYS[4] result key (likewise)
-- ARGV[1] the entry (raw bytes)   ARGV[2] events maxlen   ARGV[3] queue   ARGV[4] job id, '' when
-- none could be read   ARGV[5] error text   ARGV[6] keep seconds   ARGV[7] engine   ARGV[8] worker id
-- One bad entry at the lowest score must not trap the jobs behind it: the mover removes it
-- here and goes on. When the entry is the envelope the job's record waits on, the record ends
-- as failed too (with a result), so the job is not left "delayed" forever. The event carries
-- the job id when that job has no record or this entry was its record's; when the id names a
-- job that lives on without this entry, the event carries no id (the job's own events tell its end).
-- Returns 1 when removed (and reported), 0 when another mover got it first.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local task, attempt, job_id = '', '0', ARGV[4]
if job_id ~= '' then
  local job = redis.call('HMGET', KEYS[3], 'status', 'envelope', 'task', 'attempt', 'enqueued_at')
  if (job[1] == 'delayed' or job[1] == 'queued') and job[2] == ARGV[1] then
    task, attempt = job[3] or '', job[4] or '0'
    local keep = tonumber(ARGV[6])
    redis.call('HSET', KEYS[3], 'status', 'failed', 'finished_at', now)
    redis.call('EXPIRE', KEYS[3], keep)
    redis.call('SET', KEYS[4], cjson.encode({job_id = job_id, queue = ARGV[3], task = task, status = 'failed',
      attempts = tonumber(attempt), engine = ARGV[7], enqueued_at = tonumber(job[5] or '0'),
      finished_at = tonumber(now), error_type = 'MalformedMessage', error = ARGV[5]}), 'EX', keep)
  elseif job[1] then
    job_id = ''  -- an entry naming a job that lives on without it: that job's own events tell its end
  end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', 'job.failed', 'ts', now,
  'queue', ARGV[3], 'backend', ARGV[7], 'job_id', job_id, 'task', task, 'attempt', attempt,
  'worker_id', ARGV[8], 'duration_ms', '0', 'error', 'MalformedMessage: ' .. ARGV[5])
return 1
