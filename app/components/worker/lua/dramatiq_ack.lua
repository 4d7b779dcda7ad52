-- dramatiq_ack: Dramatiq's "ack" (dispatch.lua in dramatiq/brokers/redis) for a batch of messages,
-- without the dispatcher's per-call bookkeeping: a message leaves this consumer's acks set and,
-- only if it was still there, its data leaves the queue's .msgs hash (a message the reaper
-- already put back on the queue keeps its data, so its redelivery can be read).
-- KEYS[1] acks set of this consumer (instance)   KEYS[2] queue .msgs hash
-- ARGV[1..] message ids (redis_message_id)
-- Returns how many were acked.
local acked = 0
for i = 1, #ARGV do
  if redis.call('SREM', KEYS[1], ARGV[i]) > 0 then
    redis.call('HDEL', KEYS[2], ARGV[i])
    acked = acked + 1
  end
end
return acked
