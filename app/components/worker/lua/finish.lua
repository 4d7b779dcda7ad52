-- finish: end a running attempt with its result, terminal status and events, exactly once.
-- KEYS[1] job hash   KEYS[2] result key   KEYS[3] held set of the owner instance   KEYS[4] events stream
-- KEYS[5] dead set of the queue (zset of job ids scored by finish time, ms)
-- KEYS[6] leases hash of the queue   KEYS[7] wake-up list of its admitters
-- ARGV[1] job id   ARGV[2] owner instance   ARGV[3] attempt   ARGV[4] status
-- ARGV[5] result record: a JSON object, without finished_at (added here)   ARGV[6] keep seconds
-- ARGV[7] events maxlen   ARGV[8] dead ttl seconds
-- ARGV[9] the engine's ack of this delivery, done here with the terminal state (runtime/ack.py):
-- '' (none: the adapter acks), 'taskiq' (KEYS[8] stream, ARGV[10] entry id, ARGV[11] group),
-- 'dramatiq' (KEYS[8] acks set, KEYS[9] .msgs hash, ARGV[10] message id), 'arq' (KEYS[8..10]
-- in-progress, retry and job keys, KEYS[11] queue, KEYS[12] abort set, ARGV[10] arq job id)
-- ARGV[10], ARGV[11] the ack's arguments ('' when unused)   ARGV[12..] events, each as its number of
-- fields then that many name/value pairs (flat, no JSON to decode: this script runs once per job);
-- a 'ts' field gets Redis's time
-- finished_at and each event's ts are Redis's clock (TIME), comparable across hosts.
-- Returns 1 when written, 0 when that attempt is no longer running there: a retry of a write
-- whose reply was lost (a Redis restart), or a worker cut off while another one recovered the
-- job, must not write a terminal event a second time. Refused events are written by no one.
-- A job that ends 'failed' joins its queue's dead set in the same step, and its record and
-- result then live as long as its entry (max of keep and the dead ttl), so `app dead` can
-- show it and `app dead retry` re-enqueue its envelope; entries older than the ttl are
-- trimmed here (lazily, one ZREMRANGEBYSCORE). Cancelled jobs are not dead.
redis.call('SREM', KEYS[3], ARGV[1])
local job = redis.call('HMGET', KEYS[1], 'status', 'owner', 'attempt')
if job[1] ~= 'running' or job[2] ~= ARGV[2] or job[3] ~= ARGV[3] then
  return 0
end
-- A lease (max_concurrency) ends with its job: the queue's waiting admitters may take its slot.
if redis.call('HDEL', KEYS[6], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[7], 1)
  redis.call('LTRIM', KEYS[7], 0, 63)
  redis.call('PEXPIRE', KEYS[7], 60000)
end
local ack = ARGV[9]
if ack == 'taskiq' then
  redis.call('XACK', KEYS[8], ARGV[11], ARGV[10])
  redis.call('XDEL', KEYS[8], ARGV[10])
elseif ack == 'dramatiq' then
  if redis.call('SREM', KEYS[8], ARGV[10]) > 0 then
    redis.call('HDEL', KEYS[9], ARGV[10])
  end
elseif ack == 'arq' then
  redis.call('DEL', KEYS[8], KEYS[9], KEYS[10])
  redis.call('ZREM', KEYS[11], ARGV[10])
  redis.call('ZREM', KEYS[12], ARGV[10])
end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local keep = tonumber(ARGV[6])
if ARGV[4] == 'failed' then
  local ttl = tonumber(ARGV[8])
  if ttl > keep then keep = ttl end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. string.format('%.0f', tonumber(now) - ttl * 1000))
  redis.call('ZADD', KEYS[5], now, ARGV[1])
end
local record = string.sub(ARGV[5], 1, -2) .. ',"finished_at":' .. now .. '}'
redis.call('SET', KEYS[2], record, 'EX', keep)
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', now)
redis.call('EXPIRE', KEYS[1], keep)
local i = 12
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local fields = {unpack(ARGV, i + 1, i + 2 * n)}
  for f = 1, 2 * n, 2 do
    if fields[f] == 'ts' then fields[f + 1] = now end
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', unpack(fields))
  i = i + 1 + 2 * n
end
return 1
