-- due: take up to N due envelopes of a queue's delayed set, leasing them for a while, and say
-- when the next one is due.
-- KEYS[1] delayed zset
-- ARGV[1] max count   ARGV[2] lease ms
-- "Due" is judged by Redis's clock (TIME), the clock every due time in the set is written
-- with, so a mover on a host whose clock is off neither sends jobs early nor holds them back.
-- Returns {envelopes, wait}. The envelopes stay in the set with a score of now+lease until the
-- caller has handed them to the engine and removed them: a mover that dies mid-way loses
-- nothing, the lease runs out and another mover sends them (a duplicate is skipped at claim).
-- wait: ms from now (Redis's clock) until the next entry after the taken ones is due (0: more
-- are due now, the batch was full), -1 when there is none. The mover sleeps that long (or until a
-- wake-up token, see requeue.lua), measured on its own host's monotonic clock: a duration.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The earliest entry first: when none is due (an idle queue), that one read is the whole pass.
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not first[2] then
  return {{}, -1}
elseif tonumber(first[2]) > now then
  return {{}, math.ceil(tonumber(first[2]) - now)}
end
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, tonumber(ARGV[1]))
-- The taken entries are the lowest-ranked ones, so the next is the one ranked right after them.
local after = redis.call('ZRANGE', KEYS[1], #items, #items, 'WITHSCORES')
local wait = -1
if after[2] then
  wait = math.max(0, math.ceil(tonumber(after[2]) - now))
end
local lease = now + tonumber(ARGV[2])
for _, item in ipairs(items) do
  redis.call('ZADD', KEYS[1], 'XX', lease, item)
end
return {items, wait}
