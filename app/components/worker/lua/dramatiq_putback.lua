-- dramatiq_putback: put back on the queue messages that a LIVE worker instance's acks set records as
-- fetched but that the instance does not hold (a fetch whose reply was lost with its connection: the
-- script ran, the client never got the ids). Each goes back only if it is still in the set, so a
-- message acked or handed back meanwhile is left alone. dramatiq_recover does this for a dead instance.
-- KEYS[1] acks set of the instance   KEYS[2] queue list   KEYS[3] wake-up list of the queue
-- ARGV[1] most wake-up tokens   ARGV[2] wake-up tokens ttl ms   ARGV[3..] message ids (redis_message_id)
-- Returns how many messages went back.
local n = 0
for i = 3, #ARGV do
  if redis.call('SREM', KEYS[1], ARGV[i]) > 0 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    n = n + 1
  end
end
if n > 0 then
  for _ = 1, math.min(n, tonumber(ARGV[1])) do
    redis.call('LPUSH', KEYS[3], '1')
  end
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[1]) - 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return n
