-- enqueue: accept new jobs and make them deliverable in one atomic step: the job record, its
-- job.enqueued event, and either its place in the delayed set or the engine's own commands
-- that put its message on the queue. A refused job writes nothing, so there is never a record
-- without a message, nor a message without a record.
-- One call takes a whole batch (enqueue_many) or a single job: one round trip either way.
-- KEYS[1] events stream
-- ARGV[1] events maxlen   ARGV[2] job key prefix (job key = prefix .. id)   ARGV[3] result key prefix
-- ARGV[4] number of jobs, then per job: job id, run token, envelope JSON, task, queue, engine,
--   delay ms (0: deliverable now), delayed zset key of the queue ('' when not delayed),
--   batched (1: its message is among the shared commands below), n = number of its own engine
--   commands (run only if this job is accepted), then n times: k = word count and the k words
--   of one Redis command (what the engine adapter's stage() queues for the message).
-- then the shared commands, the same way (k, words...) to the end of ARGV: the staged batch of
--   the jobs with fresh ids (they cannot be refused), run once if any batched job is accepted.
-- Time comes from Redis (TIME): a delay is relative and the due score is Redis time + delay,
-- so a producer with a skewed clock schedules correctly.
-- Returns, per job: 1 accepted, 0 refused (a job with that id is queued, delayed or running),
-- 2 this same run was already accepted (the call retried after its reply was lost).
-- A finished job's id may be reused: its old record and result are replaced.
-- Under maxmemory (noeviction) the first write of the call is a denyoom command (XADD), so an
-- out-of-memory Redis refuses the whole call before anything is written; once a script has
-- written, Redis lets it finish, so a call is never half applied.
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local out = {}
local function read_command(i)
  local nwords = tonumber(ARGV[i])
  return {unpack(ARGV, i + 1, i + nwords)}, i + 1 + nwords
end
local batch_accepted = false
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local id, run, envelope, task = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local queue, engine, delay, delayed_key = ARGV[i + 4], ARGV[i + 5], tonumber(ARGV[i + 6]), ARGV[i + 7]
  local batched, ncmds = ARGV[i + 8] == '1', tonumber(ARGV[i + 9])
  local job_key, result_key = ARGV[2] .. id, ARGV[3] .. id
  i = i + 10
  local cmds = {}
  for c = 1, ncmds do
    cmds[c], i = read_command(i)
  end
  local job = redis.call('HMGET', job_key, 'status', 'run')
  local status = job[1]
  if job[2] == run then
    table.insert(out, 2)
  elseif status == 'queued' or status == 'delayed' or status == 'running' then
    table.insert(out, 0)
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'type', 'job.enqueued', 'ts', now,
      'queue', queue, 'backend', engine, 'job_id', id, 'task', task, 'attempt', '0',
      'worker_id', '', 'duration_ms', '', 'error', '')
    local new_status = 'queued'
    if delay > 0 then new_status = 'delayed' end
    redis.call('DEL', job_key, result_key)
    redis.call('HSET', job_key, 'status', new_status, 'attempt', 0, 'queue', queue, 'task', task,
      'envelope', envelope, 'enqueued_at', now, 'engine', engine, 'run', run)
    if delay > 0 then
      redis.call('ZADD', delayed_key, string.format('%.0f', tonumber(now) + delay), envelope)
    end
    for _, cmd in ipairs(cmds) do
      redis.call(unpack(cmd))
    end
    if batched then batch_accepted = true end
    table.insert(out, 1)
  end
end
if batch_accepted then
  while i <= #ARGV do
    local cmd
    cmd, i = read_command(i)
    redis.call(unpack(cmd))
  end
end
return out
