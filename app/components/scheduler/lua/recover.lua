-- recover: take over ticks whose claimer did not confirm their enqueue within the lease (it
-- died, or lost Redis, between claim and enqueue): re-lease them to the caller, who enqueues
-- each one whose job record does not exist yet, then confirms (ZREM).
-- KEYS[1] pending zset (job id -> lease end, ms)
-- ARGV[1] lease ms   ARGV[2] at most this many
-- Returns the job ids taken over (lease ended by Redis TIME).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, tonumber(ARGV[2]))
local lease = string.format('%.0f', now + tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], lease, id)
end
return ids
