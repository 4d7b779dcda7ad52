-- create: record a new run of a workflow (status queued: the first pass admits it).
-- KEYS[1] run hash   KEYS[2] active runs set   KEYS[3] runs index (zset)
-- KEYS[4..] keys of a finished run under the same id, deleted when it is replaced
-- ARGV[1] run id   ARGV[2] replace ('1': a finished run under this id is replaced; '0': kept)
-- ARGV[3..] field, value pairs of the run hash
-- Returns 1 created, 0 refused: a run with this id is queued, running or cancelling (or,
-- without replace, exists at all).
local status = redis.call('HGET', KEYS[1], 'status')
if status then
  if ARGV[2] ~= '1' or status == 'queued' or status == 'running' or status == 'cancelling' then
    return 0
  end
  for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
  redis.call('DEL', KEYS[1])
end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local fields = {unpack(ARGV, 3)}
redis.call('HSET', KEYS[1], 'status', 'queued', 'created', now, unpack(fields))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
if redis.call('ZCARD', KEYS[3]) > 100000 then  -- the index keeps the newest 100,000 runs
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -100001)
end
return 1
