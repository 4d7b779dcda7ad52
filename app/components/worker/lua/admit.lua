-- admit: a worker takes up to N routed jobs it may start now, and claims them for itself.
-- KEYS[1] held set of this worker instance   KEYS[2] events stream
-- ARGV[1] queue key prefix '<prefix>:{<queue>}:'   ARGV[2] job key prefix   ARGV[3] queue
-- ARGV[4] instance   ARGV[5] worker id   ARGV[6] engine   ARGV[7] events maxlen
-- ARGV[8] this worker's group ('' = default)   ARGV[9] its labels (JSON object)
-- ARGV[10] its free slots   ARGV[11] max_concurrency of the queue (0: none)
-- ARGV[12] rate limits (JSON: task -> [count, period ms])   ARGV[13] delivery token prefix
-- The ready sets this worker may take from: its group's, and those of the label selectors it
-- matches. They are scored by priority band, then sequence, so taking the lowest score across
-- them is strict priority, FIFO within a level. free = min(free slots, max_concurrency - live
-- leases), 0 while the queue is paused. A task over its rate limit (a sliding window of its
-- starts, Redis's clock) is passed over, its jobs kept in place, and the others go on.
-- A taken job is claimed here as claim.lua would (running, owner, held, job.started) plus a
-- lease when the queue has max_concurrency, so it never waits between Redis and a worker:
-- the caller runs it at once, and if the caller dies the reaper recovers it from the held set.
-- Entries whose job no longer waits for that delivery (cancelled, ended, another run) are
-- dropped; an entry that cannot be decoded is dropped with a job.failed event (its job, if it
-- still waits on it, ends when its record expires or is cancelled: the entry named no job we can trust).
-- Returns {envelope, attempt, envelope, attempt... taken, wait ms until a rate-limited task may start again (-1: none),
-- state: '' | 'paused' | 'full'}.
local qp, jp, queue = ARGV[1], ARGV[2], ARGV[3]
local instance, worker, engine, maxlen = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local free, limit = tonumber(ARGV[10]), tonumber(ARGV[11])
if redis.call('HGET', qp .. 'route', 'paused') == '1' then
  return {{}, -1, 'paused'}
end
if limit > 0 then
  free = math.min(free, limit - redis.call('HLEN', qp .. 'leases'))
end
if free <= 0 then
  return {{}, -1, 'full'}
end
local ok, labels = pcall(cjson.decode, ARGV[9])
if not ok or type(labels) ~= 'table' then labels = {} end
local ok2, limits = pcall(cjson.decode, ARGV[12])
if not ok2 or type(limits) ~= 'table' then limits = {} end

local group = ARGV[8]
if group == '' then group = '-' end
local sets = {qp .. 'ready:' .. group}
for _, sel in ipairs(redis.call('SMEMBERS', qp .. 'selectors')) do
  local match = true
  for pair in string.gmatch(sel, '[^,]+') do
    local k, v = string.match(pair, '^([^=]*)=(.*)$')
    if labels[k] ~= v then match = false end
  end
  if match then table.insert(sets, qp .. 'ready-sel:' .. sel) end
end

-- The checks Envelope.decode makes, so a taken entry never fails to decode in the worker
-- (it would be running, claimed, with no one to run it).
local function well_formed(e)
  if type(e) ~= 'table' then return false end
  for _, name in ipairs({'id', 'task', 'queue'}) do
    if type(e[name]) ~= 'string' or e[name] == '' then return false end
  end
  if e.args ~= nil and type(e.args) ~= 'table' then return false end
  if e.kwargs ~= nil and type(e.kwargs) ~= 'table' then return false end
  if e.try ~= nil and (type(e.try) ~= 'number' or e.try < 1 or e.try ~= math.floor(e.try)) then return false end
  if e.run ~= nil and type(e.run) ~= 'string' then return false end
  if e.enqueued_at ~= nil and (type(e.enqueued_at) ~= 'number' or e.enqueued_at < 0 or e.enqueued_at >= 1e15) then
    return false
  end
  if e.priority ~= nil and e.priority ~= 'high' and e.priority ~= 'low' then return false end
  if e.tags ~= nil and type(e.tags) ~= 'table' then return false end
  return true
end

local offsets, heads = {}, {}
local function load(s)
  local head = redis.call('ZRANGE', sets[s], offsets[s], offsets[s], 'WITHSCORES')
  if head[1] then heads[s] = {head[1], tonumber(head[2])} else heads[s] = false end
end
for s = 1, #sets do
  offsets[s] = 0
  load(s)
end

local t = redis.call('TIME')
local now_n = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now = string.format('%.0f', now_n)
local out, wait, budget, blocked = {}, -1, free * 4 + 64, {}
while #out / 2 < free and budget > 0 do
  budget = budget - 1
  local best = nil
  for s = 1, #sets do
    if heads[s] and (not best or heads[s][2] < heads[best][2]) then best = s end
  end
  if not best then break end
  local raw = heads[best][1]
  local okd, e = pcall(cjson.decode, raw)
  if not okd or not well_formed(e) then
    redis.call('ZREM', sets[best], raw)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'job.failed', 'ts', now, 'queue', queue,
      'backend', engine, 'job_id', '', 'task', '', 'attempt', '0', 'worker_id', worker, 'duration_ms', '0',
      'error', 'MalformedMessage: undecodable ready entry: ' .. string.gsub(string.sub(raw, 1, 200), '[^%w%p ]',
        function(c) return string.format('\\x%02x', string.byte(c)) end))
    load(best)
  else
    local try = tonumber(e.try) or 1
    local job = redis.call('HMGET', jp .. e.id, 'status', 'attempt', 'run')
    if (job[1] ~= 'queued' and job[1] ~= 'delayed') or (job[3] or '') ~= (e.run or '')
        or tonumber(job[2] or '0') ~= try - 1 then
      redis.call('ZREM', sets[best], raw)
      load(best)
    else
      local allowed = true
      local rule = limits[e.task]
      if type(rule) == 'table' then
        if blocked[e.task] then
          allowed = false
        else
          local rk = qp .. 'rate:' .. e.task
          redis.call('ZREMRANGEBYSCORE', rk, '-inf', now_n - rule[2])
          if redis.call('ZCARD', rk) >= rule[1] then
            allowed = false
            blocked[e.task] = true
            local oldest = redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')
            local w = math.max(1, tonumber(oldest[2]) + rule[2] - now_n)
            if wait < 0 or w < wait then wait = w end
          else
            redis.call('ZADD', rk, now, e.id .. ':' .. try)
            redis.call('PEXPIRE', rk, rule[2] + 1000)
          end
        end
      end
      if not allowed then
        offsets[best] = offsets[best] + 1
        load(best)
      else
        redis.call('HSET', jp .. e.id, 'status', 'running', 'attempt', try, 'worker', worker, 'owner', instance,
          'started_at', now, 'delivery', ARGV[13] .. (#out / 2))
        redis.call('SADD', KEYS[1], e.id)
        local fields = {'type', 'job.started', 'ts', now, 'queue', queue, 'backend', engine, 'job_id', e.id,
          'task', e.task, 'attempt', try, 'worker_id', worker, 'duration_ms', '', 'error', ''}
        if type(e.tags) == 'table' then
          local names = {}
          for k, _ in pairs(e.tags) do table.insert(names, k) end
          table.sort(names)
          local parts = {}
          for _, k in ipairs(names) do table.insert(parts, k .. '=' .. tostring(e.tags[k])) end
          if #parts > 0 then
            table.insert(fields, 'tags')
            table.insert(fields, table.concat(parts, ','))
          end
        end
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(fields))
        if limit > 0 then redis.call('HSET', qp .. 'leases', e.id, instance) end
        redis.call('ZREM', sets[best], raw)
        table.insert(out, raw)
        table.insert(out, try)
        load(best)
      end
    end
  end
end
return {out, wait, ''}
