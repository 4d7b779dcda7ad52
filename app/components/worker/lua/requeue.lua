-- requeue: put a running attempt back to wait in the delayed set, with its events, exactly once.
-- Used for a retry (attempt stays), a hand-back on shutdown (attempt - 1: not the job's fault)
-- and a crash recovery by the reaper (attempt stays: the lost attempt counts).
-- KEYS[1] job hash   KEYS[2] delayed zset of the queue   KEYS[3] held set of the owner   KEYS[4] events
-- KEYS[5] wake-up list of the queue's delayed movers   KEYS[6] leases hash of the queue
-- KEYS[7] wake-up list of the queue's admitters
-- ARGV[1] job id   ARGV[2] owner instance   ARGV[3] attempt running   ARGV[4] attempt to record
-- ARGV[5] next envelope JSON   ARGV[6] delay ms from now (the backoff; 0: due at once)
-- ARGV[7] events maxlen   ARGV[8..] events (JSON objects of string fields)
-- The due time is Redis's clock (TIME) + the delay, so the host clock of the worker that
-- decided the retry does not matter; each event's ts is Redis's clock too.
-- When the entry is (one of) the earliest of the set, a wake-up token is pushed (one kept, for
-- a minute): idle movers sleep until the earliest due time they know of, so only a new earliest
-- entry needs to wake one (the same rule as enqueue.lua's delayed branch).
-- Returns 1 when requeued, 0 when that attempt is no longer running there.
redis.call('SREM', KEYS[3], ARGV[1])
local job = redis.call('HMGET', KEYS[1], 'status', 'owner', 'attempt')
if job[1] ~= 'running' or job[2] ~= ARGV[2] or job[3] ~= ARGV[3] then
  return 0
end
-- A lease (max_concurrency) ends with the attempt: a retry waits for a slot like any job.
if redis.call('HDEL', KEYS[6], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[7], 1)
  redis.call('LTRIM', KEYS[7], 0, 63)
  redis.call('PEXPIRE', KEYS[7], 60000)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ts = string.format('%.0f', now)
redis.call('HSET', KEYS[1], 'status', 'delayed', 'attempt', ARGV[4], 'envelope', ARGV[5])
local due = now + math.max(0, tonumber(ARGV[6]))
redis.call('ZADD', KEYS[2], due, ARGV[5])
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if tonumber(first[2]) >= due then
  redis.call('LPUSH', KEYS[5], 1)
  redis.call('LTRIM', KEYS[5], 0, 0)
  redis.call('PEXPIRE', KEYS[5], 60000)
end
for i = 8, #ARGV do
  local fields = {}
  for name, value in pairs(cjson.decode(ARGV[i])) do
    if name == 'ts' then value = ts end
    table.insert(fields, name)
    table.insert(fields, value)
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', unpack(fields))
end
return 1
