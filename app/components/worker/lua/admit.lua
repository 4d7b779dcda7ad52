-- admit: a worker takes up to N routed jobs it may start now, and claims them for itself.
-- KEYS[1] held set of this worker instance   KEYS[2] events stream
-- ARGV[1] queue key prefix '<prefix>:{<queue>}:'   ARGV[2] job key prefix   ARGV[3] queue
-- ARGV[4] instance   ARGV[5] worker id   ARGV[6] engine   ARGV[7] events maxlen
-- ARGV[8] this worker's group ('' = default)   ARGV[9] its labels (JSON object)
-- ARGV[10] its free slots   ARGV[11] max_concurrency of the queue (0: none)
-- ARGV[12] rate limits (JSON: task -> [count, period ms])   ARGV[13] delivery token prefix
-- ARGV[14] result key prefix
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
-- Returns {{envelope, attempt, job id, task} for each job taken, flattened; wait ms until a rate-limited task may start again (-1: none),
-- state: '' | 'paused' | 'full', size of this instance's held set (more than it runs: a reply of
-- an earlier pass was lost, even one redis-py resent on its own; the caller adopts those jobs)}.
local qp, jp, queue = ARGV[1], ARGV[2], ARGV[3]
local instance, worker, engine, maxlen = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local free, limit = tonumber(ARGV[10]), tonumber(ARGV[11])
if redis.call('HGET', qp .. 'route', 'paused') == '1' then
  return {{}, -1, 'paused', redis.call('SCARD', KEYS[1])}
end
if limit > 0 then
  free = math.min(free, limit - redis.call('HLEN', qp .. 'leases'))
end
if free <= 0 then
  return {{}, -1, 'full', redis.call('SCARD', KEYS[1])}
end
local ok, labels = pcall(cjson.decode, ARGV[9])
if not ok or type(labels) ~= 'table' then labels = {} end
local ok2, limits = pcall(cjson.decode, ARGV[12])
if not ok2 or type(limits) ~= 'table' then limits = {} end

local group = ARGV[8]
if group == '' then group = '-' end
local bases = {['ready:' .. group] = true}
for _, sel in ipairs(redis.call('SMEMBERS', qp .. 'selectors')) do
  local match = true
  for pair in string.gmatch(sel, '[^,]+') do
    local k, v = string.match(pair, '^([^=]*)=(.*)$')
    if labels[k] ~= v then match = false end
  end
  if match then bases['ready-sel:' .. sel] = true end
end
-- A rate-limited task waits in a set of its own beside its base set ('<base>|<task>'): when the
-- task is at its limit the whole set is passed over, and the other tasks go on in order.
local sets = {}
for base, _ in pairs(bases) do table.insert(sets, qp .. base) end
for _, name in ipairs(redis.call('SMEMBERS', qp .. 'limited')) do
  local base = string.match(name, '^(.*)|[^|]*$')
  if base and bases[base] then table.insert(sets, qp .. name) end
end

-- The checks Envelope.decode makes, so a taken entry never fails to decode in the worker
-- (it would be running, claimed, with no one to run it).
local function well_formed(e)
  if type(e) ~= 'table' then return false end
  for _, name in ipairs({'id', 'task', 'queue'}) do
    if type(e[name]) ~= 'string' or e[name] == '' then return false end
  end
  if e.args ~= nil then
    if type(e.args) ~= 'table' then return false end
    local n = 0
    for _ in pairs(e.args) do n = n + 1 end
    if n ~= #e.args then return false end  -- an object, not a list
  end
  if e.kwargs ~= nil then
    if type(e.kwargs) ~= 'table' then return false end
    for k, _ in pairs(e.kwargs) do
      if type(k) ~= 'string' then return false end  -- a non-empty list, not an object
    end
  end
  if e.try ~= nil and (type(e.try) ~= 'number' or e.try < 1 or e.try ~= math.floor(e.try) or e.try > 1e9) then
    return false
  end
  if e.run ~= nil and type(e.run) ~= 'string' then return false end
  if e.group ~= nil and type(e.group) ~= 'string' then return false end
  if e.selector ~= nil and type(e.selector) ~= 'string' then return false end
  if e.enqueued_at ~= nil and (type(e.enqueued_at) ~= 'number' or e.enqueued_at < 0 or e.enqueued_at >= 1e15) then
    return false
  end
  if e.priority ~= nil and e.priority ~= 'high' and e.priority ~= 'low' then return false end
  if e.tags ~= nil then
    if type(e.tags) ~= 'table' then return false end
    for k, v in pairs(e.tags) do
      if type(k) ~= 'string' or type(v) ~= 'string' then return false end
    end
  end
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
while #out / 4 < free and budget > 0 do
  budget = budget - 1
  local best = nil
  for s = 1, #sets do
    if heads[s] and (not best or heads[s][2] < heads[best][2]) then best = s end
  end
  if not best then break end
  local raw = heads[best][1]
  local okd, e = pcall(cjson.decode, raw)
  if not okd or not well_formed(e) then
    -- Written behind the layer's back (the layer refuses what Lua cannot read at enqueue). When
    -- it is the envelope its job's record waits on, that job ends failed too, never queued forever.
    redis.call('ZREM', sets[best], raw)
    local shown = string.gsub(string.sub(raw, 1, 200), '[^%w%p ]',
      function(c) return string.format('\\x%02x', string.byte(c)) end)
    local pid = string.match(raw, '^{"id":"([^"\\]+)"') or ''
    if pid ~= '' then
      local job = redis.call('HMGET', jp .. pid, 'status', 'envelope', 'task')
      if (job[1] == 'queued' or job[1] == 'delayed') and job[2] == raw then
        redis.call('HSET', jp .. pid, 'status', 'failed', 'finished_at', now)
        redis.call('EXPIRE', jp .. pid, 86400)
        redis.call('SET', ARGV[14] .. pid, cjson.encode({job_id = pid, queue = queue, task = job[3] or '',
          status = 'failed', attempts = 0, engine = engine, finished_at = now_n, error_type = 'MalformedMessage',
          error = 'undecodable ready entry: ' .. shown}), 'EX', 86400)
      else
        pid = ''
      end
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'job.failed', 'ts', now, 'queue', queue,
      'backend', engine, 'job_id', pid, 'task', '', 'attempt', '0', 'worker_id', worker, 'duration_ms', '0',
      'error', 'MalformedMessage: undecodable ready entry: ' .. shown)
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
        heads[best] = false  -- its own set: every job of that task waits for the window
      else
        redis.call('HSET', jp .. e.id, 'status', 'running', 'attempt', try, 'worker', worker, 'owner', instance,
          'started_at', now, 'delivery', ARGV[13] .. (#out / 4))
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
        table.insert(out, e.id)
        table.insert(out, e.task)
        load(best)
      end
    end
  end
end
return {out, wait, '', redis.call('SCARD', KEYS[1])}
