-- claim: apply one pass's plan for one schedule, once. Compare-and-set on the schedule's
-- cursor (every tick at or before it is handled): only the scheduler that read the current
-- cursor advances it, so several schedulers never fire the same tick. In the same atomic step,
-- the ticks to fire are leased in the pending set (enqueued by the claimer; if it dies before
-- confirming, another scheduler enqueues them after the lease), and the events are written.
-- KEYS[1] schedule state hash   KEYS[2] pending zset (job id -> lease end, ms)   KEYS[3] events stream
-- ARGV[1] expected cursor ('' = none yet; '*' = no compare, cursor untouched: a manual trigger)
-- ARGV[2] new cursor   ARGV[3] lease ms   ARGV[4] events maxlen
-- ARGV[5] queue   ARGV[6] task   ARGV[7] schedule name   ARGV[8] scheduler id
-- ARGV[9] n fired, then per fired tick: job id, tick ISO, reason
-- then: missed count, first ISO, last ISO, reason; skipped count, first ISO, last ISO, reason
-- Times (lease end, event ts, last_fired_at) come from Redis TIME.
-- Returns 1 applied, 0 refused (the cursor moved: another scheduler applied this pass).
local expected = ARGV[1]
if expected ~= '*' then
  local cursor = redis.call('HGET', KEYS[1], 'cursor') or ''
  if cursor ~= expected then return 0 end
  redis.call('HSET', KEYS[1], 'cursor', ARGV[2])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ts = string.format('%.0f', now)
local lease = string.format('%.0f', now + tonumber(ARGV[3]))
local function event(kind, job_id, tick, until_, count, reason)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'type', kind, 'ts', ts,
    'queue', ARGV[5], 'backend', '', 'job_id', job_id, 'task', ARGV[6], 'attempt', '',
    'worker_id', ARGV[8], 'duration_ms', '', 'error', '', 'schedule', ARGV[7],
    'tick', tick, 'until', until_, 'count', count, 'reason', reason)
end
local i = 10
local fired = tonumber(ARGV[9])
for _ = 1, fired do
  local job_id, tick, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('ZADD', KEYS[2], lease, job_id)
  event('schedule.fired', job_id, tick, tick, '1', reason)
  redis.call('HSET', KEYS[1], 'last_job', job_id, 'last_tick', tick, 'last_fired_at', ts)
  i = i + 3
end
if fired > 0 then redis.call('HINCRBY', KEYS[1], 'fired', fired) end
for _, kind in ipairs({'missed', 'skipped'}) do
  local count = tonumber(ARGV[i])
  if count > 0 then
    redis.call('HINCRBY', KEYS[1], kind, count)
    event('schedule.' .. kind, '', ARGV[i + 1], ARGV[i + 2], ARGV[i], ARGV[i + 3])
  end
  i = i + 4
end
return 1
