-- fold: count the events written since the last fold into the dashboard's counters, in the same
-- step as moving the cursor, so several dashboards (or one restarted) count every event once.
-- KEYS[1] events stream   KEYS[2] counters hash   KEYS[3] per-minute hash
-- ARGV[1] most entries to fold in this call
-- ARGV[2..] upper bounds (ms, ascending) of the run-time histogram buckets
-- Fields of KEYS[2]:
--   ~cursor  id of the last entry folded         ~folded  entries folded
--   ~base    entries trimmed from the stream before the first fold (Redis 7: XINFO entries-added)
--   ~dropped entries trimmed before they were folded (Redis 7; set when the fold reaches the end)
--   j|<queue>|<task>|<engine>|<outcome>  outcome: enqueued, completed, retried, failed, cancelled
--   h|<queue>|<task>|<engine>|<i>        attempts whose run time fell in bucket i (1-based, not cumulative)
--   hs|<queue>|<task>|<engine>           sum of run times (ms)   hc|...  attempts timed
-- Fields of KEYS[3]: <unix minute>|<queue>|<completed|failed>
-- Returns {entries folded by this call, 1 when the end of the stream was reached}.
local function added()
  local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[1])
  if not ok then return nil end
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then return tonumber(info[i + 1]) end
  end
  return nil
end

local cursor = redis.call('HGET', KEYS[2], '~cursor')
if not cursor then
  cursor = '0-0'
  local total = added()
  if total then
    redis.call('HSET', KEYS[2], '~base', total - redis.call('XLEN', KEYS[1]))
  end
end
local limit = tonumber(ARGV[1])
local bounds = {}
for i = 2, #ARGV do bounds[#bounds + 1] = tonumber(ARGV[i]) end

local entries = redis.call('XRANGE', KEYS[1], '(' .. cursor, '+', 'COUNT', limit)
local counts, minutes, sums = {}, {}, {}
local function bump(t, field, by)
  t[field] = (t[field] or 0) + by
end
for _, entry in ipairs(entries) do
  local f = {}
  local kv = entry[2]
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  local kind = f['type'] or ''
  local outcome = nil
  if kind == 'job.completed' then outcome = 'completed'
  elseif kind == 'job.retried' then outcome = 'retried'
  elseif kind == 'job.enqueued' then outcome = 'enqueued'
  elseif kind == 'job.failed' then
    if string.sub(f['error'] or '', 1, 10) == 'Cancelled:' then outcome = 'cancelled' else outcome = 'failed' end
  end
  if outcome then
    local labels = (f['queue'] or '') .. '|' .. (f['task'] or '') .. '|' .. (f['backend'] or '')
    bump(counts, 'j|' .. labels .. '|' .. outcome, 1)
    local ms = tonumber(f['duration_ms'] or '')
    if ms and (outcome == 'completed' or outcome == 'retried' or outcome == 'failed') then
      local b = #bounds + 1
      for i, le in ipairs(bounds) do
        if ms <= le then b = i break end
      end
      bump(counts, 'h|' .. labels .. '|' .. b, 1)
      bump(counts, 'hc|' .. labels, 1)
      bump(sums, 'hs|' .. labels, ms)
    end
    if outcome == 'completed' or outcome == 'failed' then
      local minute = math.floor(tonumber(string.match(entry[1], '^(%d+)')) / 60000)
      bump(minutes, string.format('%d', minute) .. '|' .. (f['queue'] or '') .. '|' .. outcome, 1)
    end
  end
end
for field, n in pairs(counts) do redis.call('HINCRBY', KEYS[2], field, n) end
for field, n in pairs(sums) do redis.call('HINCRBYFLOAT', KEYS[2], field, n) end
for field, n in pairs(minutes) do redis.call('HINCRBY', KEYS[3], field, n) end
local done = 0
if #entries < limit then done = 1 end
if #entries > 0 then
  redis.call('HSET', KEYS[2], '~cursor', entries[#entries][1])
  redis.call('HINCRBY', KEYS[2], '~folded', #entries)
end
if done == 1 then
  local total = added()
  local base = redis.call('HGET', KEYS[2], '~base')
  if total and base then
    local folded = tonumber(redis.call('HGET', KEYS[2], '~folded') or '0')
    redis.call('HSET', KEYS[2], '~dropped', math.max(0, total - tonumber(base) - folded))
  end
end
return {#entries, done}
