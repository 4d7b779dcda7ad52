-- forget: the reaper takes an offline instance off its watch list, once nothing is held.
-- KEYS[1] instances zset   KEYS[2] held set of the instance   KEYS[3] members hash of its queue
-- ARGV[1] instances member '<queue>|<instance>'   ARGV[2] offline threshold (ms)   ARGV[3] instance
-- The reaper recovers held jobs one by one (finish and requeue remove each from the held set);
-- reading the set and deleting it afterwards would drop a claim made in between. So the
-- instance goes only when its held set is empty and it is still offline by Redis's clock
-- (a frozen worker that beats again is live again), in one atomic step.
-- Returns 1 when removed, 0 when jobs are still held, -1 when the instance beat again (or is gone).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now - tonumber(score) < tonumber(ARGV[2]) then
  return -1
end
if redis.call('SCARD', KEYS[2]) > 0 then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
