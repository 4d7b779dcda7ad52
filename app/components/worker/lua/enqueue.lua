-- enqueue: record new jobs (and their job.enqueued events), refusing live duplicate ids.
-- One call records a whole batch (enqueue_many) or a single job: one round trip either way.
-- KEYS[1] delayed zset of the queue   KEYS[2] events stream
-- ARGV[1] key prefix   ARGV[2] now ms   ARGV[3] events maxlen   ARGV[4] engine   ARGV[5] queue
-- then per job, 4 values: job id, envelope JSON, task, due ms (0: the caller sends it now)
-- Job and result keys are derived from the prefix (<prefix>:job:<id>, <prefix>:result:<id>):
-- the layer runs on one Redis (or one slot's worth of keys), not Redis Cluster.
-- Returns, per job: 1 recorded, 0 refused (a job with that id is queued, delayed or running),
-- 2 this same envelope was already recorded (a call retried after its reply was lost).
-- A finished job's id may be reused: its old record and result are replaced.
local out = {}
for i = 6, #ARGV, 4 do
  local id, envelope, task, due = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local job_key = ARGV[1] .. ':job:' .. id
  local status = redis.call('HGET', job_key, 'status')
  if status == 'queued' or status == 'delayed' or status == 'running' then
    if redis.call('HGET', job_key, 'envelope') == envelope then
      table.insert(out, 2)
    else
      table.insert(out, 0)
    end
  else
    local new_status = 'queued'
    if due > 0 then new_status = 'delayed' end
    redis.call('DEL', job_key, ARGV[1] .. ':result:' .. id)
    redis.call('HSET', job_key, 'status', new_status, 'attempt', 0, 'queue', ARGV[5], 'task', task,
      'envelope', envelope, 'enqueued_at', ARGV[2], 'engine', ARGV[4])
    if due > 0 then
      redis.call('ZADD', KEYS[1], due, envelope)
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'job.enqueued', 'ts', ARGV[2],
      'queue', ARGV[5], 'backend', ARGV[4], 'job_id', id, 'task', task, 'attempt', '0',
      'worker_id', '', 'duration_ms', '', 'error', '')
    table.insert(out, 1)
  end
end
return out
