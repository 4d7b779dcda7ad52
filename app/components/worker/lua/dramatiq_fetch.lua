-- dramatiq_fetch: Dramatiq's "fetch" (dispatch.lua in dramatiq/brokers/redis) returning each message's
-- id with its data, so the consumer can ack, and report, an id whose data is missing or unreadable.
-- KEYS[1] queue list   KEYS[2] queue .msgs hash   KEYS[3] acks set of this consumer (instance)
-- ARGV[1] how many messages at most
-- Returns {id1, data1, id2, data2, ...}; a data is nil when the hash has no entry for that id.
local out = {}
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LPOP', KEYS[1])
  if not id then
    break
  end
  redis.call('SADD', KEYS[3], id)
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id))
end
return out
