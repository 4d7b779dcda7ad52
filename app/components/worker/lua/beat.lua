-- beat: write one worker process's heartbeat, stamped with Redis's clock.
-- KEYS[1] heartbeat key   KEYS[2] workers zset   KEYS[3] engines hash of the queue
-- KEYS[4] instances zset   KEYS[5] held set of this instance   KEYS[6] members hash of the queue
-- ARGV[1] payload: a non-empty JSON object, without last_beat (added here)   ARGV[2] TTL seconds
-- ARGV[3] workers member '<queue>|<worker id>'   ARGV[4] engine   ARGV[5] instances member
-- '<queue>|<instance>'   ARGV[6] state: '' while running, 'stopped' for the last beat of a clean stop
-- ARGV[7] instance   ARGV[8] its member record: JSON {group, labels}, what a job's target is
-- matched against at enqueue (the instance's liveness is its score in the instances zset)
-- ARGV[9] (optional) offline threshold ms: then the beat also lists the instances whose last
-- beat is older (the reaper's question, offline.lua's without its scores), so the reaper of this
-- process needs no call of its own while nobody is offline (runtime/reaper.py); false when
-- Redis refused that read (the reaper then asks itself)
-- Every age and cutoff is computed against Redis's clock (TIME), never a host's, so a worker
-- whose clock is off is judged by when it really beat.
-- A stopped instance leaves the reaper's watch list only when its held set is empty: a job it
-- could not hand back (Redis refused the hand-back) stays held, and the reaper recovers it once
-- the instance's last beat is older than the offline threshold.
-- Returns the beat time (unix ms, Redis's clock); with ARGV[9], {beat time, offline members}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = string.format('%.0f', now)
local payload = '{"last_beat":' .. string.format('%d.%03d', tonumber(t[1]), math.floor(tonumber(t[2]) / 1000))
  .. ',"last_beat_ms":' .. ms .. ',' .. string.sub(ARGV[1], 2)
redis.call('SET', KEYS[1], payload, 'EX', tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], ms, ARGV[3])
if ARGV[6] == 'stopped' then
  redis.call('HDEL', KEYS[3], ARGV[4])
  redis.call('HDEL', KEYS[6], ARGV[7])
  if redis.call('SCARD', KEYS[5]) == 0 then
    redis.call('ZREM', KEYS[4], ARGV[5])
  end
else
  redis.call('HSET', KEYS[3], ARGV[4], ms)
  redis.call('ZADD', KEYS[4], ms, ARGV[5])
  redis.call('HSET', KEYS[6], ARGV[7], ARGV[8])
  if ARGV[9] then  -- pcall: the beat never fails for the reaper's question (an ACL may refuse it)
    local offline = redis.pcall('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('%.0f', now - tonumber(ARGV[9])))
    if offline.err then return {now, false} end
    return {now, offline}
  end
end
return now
