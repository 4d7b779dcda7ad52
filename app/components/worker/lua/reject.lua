-- reject: end a job whose delivery cannot run (a message the worker cannot decode, or a
-- delivery with no job record), with a failed record, its result and its job.failed event,
-- exactly once: a second delivery of the same message finds the job ended and writes nothing.
-- KEYS[1] job hash   KEYS[2] result key   KEYS[3] events stream
-- KEYS[4] dead set of the queue (zset of job ids scored by finish time, ms)
-- ARGV[1] job id   ARGV[2] run token of the delivery ('*': unknown, any run)
-- ARGV[3] try of the delivery (0: unknown, any attempt)   ARGV[4] queue   ARGV[5] task
-- ARGV[6] engine   ARGV[7] keep seconds   ARGV[8] events maxlen
-- ARGV[9] result record: a JSON object, without finished_at (added here)
-- ARGV[10] dead ttl seconds
-- ARGV[11..] events (JSON objects of string fields), written only when the job is ended here
-- finished_at and each event's ts are Redis's clock (TIME), comparable across hosts.
-- Returns 1 when the job was ended here, 0 when the delivery is not the job's current one
-- (another run, another attempt, or the job is running or already ended): nothing written.
-- With no record at all (it expired after keep_result, or the message was written behind the
-- layer's back), a failed record is created under the delivery's run.
-- The job joins the queue's dead set, and its record and result live as long as its entry (max
-- of keep and the dead ttl); entries older than the ttl are trimmed here (see finish.lua).
local job = redis.call('HMGET', KEYS[1], 'status', 'run', 'attempt')
local status = job[1]
if status then
  if ARGV[2] ~= '*' and (job[2] or '') ~= ARGV[2] then return 0 end
  if status ~= 'queued' and status ~= 'delayed' then return 0 end
  local try = tonumber(ARGV[3])
  if try > 0 and tonumber(job[3] or '0') ~= try - 1 then return 0 end
end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local keep = tonumber(ARGV[7])
local ttl = tonumber(ARGV[10])
if ttl > keep then keep = ttl end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%.0f', tonumber(now) - ttl * 1000))
redis.call('ZADD', KEYS[4], now, ARGV[1])
for i = 11, #ARGV do
  local fields = {}
  for name, value in pairs(cjson.decode(ARGV[i])) do
    if name == 'ts' then value = now end
    table.insert(fields, name)
    table.insert(fields, value)
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', unpack(fields))
end
redis.call('SET', KEYS[2], string.sub(ARGV[9], 1, -2) .. ',"finished_at":' .. now .. '}', 'EX', keep)
if status then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', now)
else
  local run = ARGV[2]
  if run == '*' then run = '' end
  redis.call('HSET', KEYS[1], 'status', 'failed', 'attempt', 0, 'queue', ARGV[4], 'task', ARGV[5],
    'engine', ARGV[6], 'run', run, 'enqueued_at', now, 'finished_at', now)
end
redis.call('EXPIRE', KEYS[1], keep)
return 1
