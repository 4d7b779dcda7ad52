-- route: put routed envelopes (due from the delayed set: a delayed routed job, a retry, a
-- hand-back, a recovery) in their ready set, and wake the queue's admitters.
-- KEYS[1] the queue's route hash (not read: it names the queue's slot, for Redis Cluster; the
-- queue's keys share its hash tag and are built from ARGV[1])
-- ARGV[1] queue key prefix '<prefix>:{<queue>}:'   ARGV[2..] envelopes (JSON)
-- An envelope whose job no longer waits is dropped later, at admission. The score is priority
-- band then sequence, so a retried job waits behind the jobs of its level already ready.
-- Returns how many were placed.
local qp = ARGV[1]
local wakes = {}
for i = 2, #ARGV do
  local ok, e = pcall(cjson.decode, ARGV[i])
  if not ok or type(e) ~= 'table' then e = {} end
  local band, key = 1, 'ready:-'
  local wake = qp .. 'ready-wake:-'
  if e.priority == 'high' then band = 0 end
  if type(e.selector) == 'string' and e.selector ~= '' then
    key = 'ready-sel:' .. e.selector
    wake = qp .. 'ready-wake'
    redis.call('SADD', qp .. 'selectors', e.selector)
  elseif type(e.group) == 'string' and e.group ~= '' then
    key = 'ready:' .. e.group
    wake = qp .. 'ready-wake:' .. e.group
    redis.call('SADD', qp .. 'groups', e.group)
  end
  wakes[wake] = true
  if e.limited == true and type(e.task) == 'string' then
    key = key .. '|' .. e.task
    redis.call('SADD', qp .. 'limited', key)
  end
  redis.call('ZADD', qp .. key, band * 4398046511104 + redis.call('INCR', qp .. 'seq'), ARGV[i])
end
for wake, _ in pairs(wakes) do
  redis.call('LPUSH', wake, 1)
  redis.call('LTRIM', wake, 0, 63)
  redis.call('PEXPIRE', wake, 60000)
end
return #ARGV - 1
