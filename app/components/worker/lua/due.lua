-- due: take up to N due envelopes of a queue's delayed set, leasing them for a while.
-- KEYS[1] delayed zset
-- ARGV[1] max count   ARGV[2] lease ms
-- "Due" is judged by Redis's clock (TIME), the clock every due time in the set is written
-- with, so a mover on a host whose clock is off neither sends jobs early nor holds them back.
-- Returns the envelopes. They stay in the set with a score of now+lease until the caller
-- has handed them to the engine and removed them: a mover that dies mid-way loses nothing,
-- the lease runs out and another mover sends them (a duplicate is skipped at claim).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, tonumber(ARGV[1]))
local lease = now + tonumber(ARGV[2])
for _, item in ipairs(items) do
  redis.call('ZADD', KEYS[1], 'XX', lease, item)
end
return items
