-- offline: the instances whose last beat is older than the offline threshold, by Redis's clock.
-- KEYS[1] instances zset
-- ARGV[1] offline threshold (ms)
-- Returns a flat list: member, age in ms, member, age in ms, ...
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - tonumber(ARGV[1])), 'WITHSCORES')
local out = {}
for i = 1, #found, 2 do
  table.insert(out, found[i])
  table.insert(out, string.format('%.0f', now - tonumber(found[i + 1])))
end
return out
