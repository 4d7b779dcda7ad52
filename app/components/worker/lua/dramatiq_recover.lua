-- dramatiq_recover: put back on the queue every message a worker instance fetched and did not ack,
-- and forget the instance (its acks set, its entry in Dramatiq's heartbeats). Dramatiq's own
-- "maintenance" does this for consumers dead for heartbeat_timeout, by chance and with KEYS; the
-- layer does it for an instance its reaper found offline, and for itself when it stops.
-- KEYS[1] acks set of the instance   KEYS[2] queue list   KEYS[3] Dramatiq heartbeats zset
-- KEYS[4] wake-up list of the queue
-- ARGV[1] instance (Dramatiq broker id)   ARGV[2] most wake-up tokens   ARGV[3] wake-up tokens ttl ms
-- Returns how many messages went back. Ids whose data is gone go back too: the fetch reports them.
local ids = redis.call('SMEMBERS', KEYS[1])
for _, id in ipairs(ids) do
  redis.call('RPUSH', KEYS[2], id)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if #ids > 0 then
  for _ = 1, math.min(#ids, tonumber(ARGV[2])) do
    redis.call('LPUSH', KEYS[4], '1')
  end
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[2]) - 1)
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return #ids
