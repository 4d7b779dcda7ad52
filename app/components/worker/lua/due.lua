-- due: take up to N due envelopes of a queue's delayed set, leasing them for a while.
-- KEYS[1] delayed zset
-- ARGV[1] now ms   ARGV[2] max count   ARGV[3] lease ms
-- Returns the envelopes. They stay in the set with a score of now+lease until the caller
-- has handed them to the engine and removed them: a mover that dies mid-way loses nothing,
-- the lease runs out and another mover sends them (a duplicate is skipped at claim).
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local lease = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, item in ipairs(items) do
  redis.call('ZADD', KEYS[1], 'XX', lease, item)
end
return items
