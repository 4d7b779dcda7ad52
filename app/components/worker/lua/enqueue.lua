-- enqueue: accept new jobs and make them deliverable in one atomic step: the job record, its
-- job.enqueued event, and either its place in the delayed set, its place in the queue's ready
-- set (a routed job: see routing/admit.py), or the engine's own commands that put its message
-- on the queue. A refused job writes nothing, so there is never a record without a message,
-- nor a message without a record.
-- One call takes a whole batch (enqueue_many) or a single job: one round trip either way.
-- KEYS[1] events stream
-- KEYS[2] (optional) the chain of one bulk call sent in several script calls (Keys.enqueue_chain,
--   see components/worker/bulk.py): then the last ARGV is this call's position in it (1, 2, ...).
--   A position already applied returns its flags again (as 2, or 0) and writes nothing (a resend
--   after a lost reply); a position whose predecessor was not applied (Redis refused it) returns
--   nil and writes nothing, so the chunks of a call apply in order, each only after the one
--   before. Jobs with fresh ids skip their record check: such an id cannot be taken, and the
--   chain recognises a resend.
-- ARGV[1] events maxlen   ARGV[2] job key prefix (job key = prefix .. id)   ARGV[3] result key prefix
-- ARGV[4] instances zset (who beats: for a target's fallback)
-- ARGV[5] number of shapes: what jobs of one call usually share, sent once, then per shape:
--   task, queue, engine, delayed zset key of the queue and the wake-up list of its movers ('' when
--   not delayed), batched (1: its message is among the queue's shared commands below), queue key
--   prefix ('<prefix>:{<queue>}:'), routed (1: the job needs routing), priority, group, selector,
--   rate-limited task ('' when its task has no rate limit: see Keys.limited), fallback
--   (wait|fail|cancel), healthy ms (a target worker counts when it beat that recently), keep
--   seconds (for a job ended by its fallback), dead ttl seconds (a job failed by its fallback is a
--   dead letter: retried with `app dead retry`), tags ('k=v,...'), chosen (1: a caller-chosen id)
-- then the number of jobs, and per job: job id, run token, envelope JSON, shape number (from 1),
--   delay ms (0: deliverable now),
--   n = number of its own engine commands (run only if this job is accepted and not routed),
--   then n times: k = word count and the k words of one Redis command (what the engine adapter's
--   stage() queues for the message).
-- then the number of queue blocks, and per block: queue key prefix, n, and n commands as above:
--   the staged batch of that queue's jobs with fresh ids (they cannot be refused), run once if
--   any of them is accepted and the queue is not routed.
-- Routing: a job goes to the ready set instead of the engine when it needs routing itself, or
-- its queue is paused or routed (the queue's 'route' hash): a job that needs routing marks the
-- queue routed, so later plain jobs queue behind it in order (strict priorities). A targeted
-- job (group or selector) with no healthy target worker follows its fallback: wait (the ready
-- set), fail (failed at once, NoWorker) or cancel (cancelled at once).
-- Time comes from Redis (TIME): a delay is relative and the due score is Redis time + delay,
-- so a producer with a skewed clock schedules correctly. A delayed job that is (one of) the
-- earliest of its queue's delayed set pushes a wake-up token (one kept, for a minute): idle
-- movers sleep until the earliest due time they know of (see requeue.lua, due.lua).
-- Returns, per job: 1 accepted, 0 refused (a job with that id is queued, delayed or running),
-- 2 this same run was already accepted (the call retried after its reply was lost),
-- 3 accepted and ended at once by its fallback (fail or cancel).
-- A finished job's id may be reused: its old record and result are replaced.
-- Under maxmemory (noeviction) the first write of the call is a denyoom command (XADD), so an
-- out-of-memory Redis refuses the whole call before anything is written; once a script has
-- written, Redis lets it finish, so a call is never half applied.
local chain, position = KEYS[2], nil
if chain then
  position = ARGV[#ARGV]
  local done = redis.call('HGET', chain, position)
  if done then
    local again = {}
    for c in string.gmatch(done, '%d') do
      if c == '0' then table.insert(again, 0) else table.insert(again, 2) end
    end
    return again
  end
  if position ~= '1' and redis.call('HGET', chain, 'last') ~= tostring(tonumber(position) - 1) then
    return false
  end
end
local t = redis.call('TIME')
local now_n = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now = string.format('%.0f', now_n)
local maxlen = ARGV[1]
local out = {}
local function read_command(i)
  local nwords = tonumber(ARGV[i])
  return {unpack(ARGV, i + 1, i + nwords)}, i + 1 + nwords
end

local function place(qp, envelope, priority, group, selector, limited)
  local band = 1
  if priority == 'high' then band = 0 end
  local key
  if selector ~= '' then
    key = 'ready-sel:' .. selector
    redis.call('SADD', qp .. 'selectors', selector)
  else
    if group == '' then group = '-' end
    key = 'ready:' .. group
    redis.call('SADD', qp .. 'groups', group)
  end
  if limited ~= '' then
    key = key .. '|' .. limited
    redis.call('SADD', qp .. 'limited', key)
  end
  key = qp .. key
  redis.call('ZADD', key, band * 4398046511104 + redis.call('INCR', qp .. 'seq'), envelope)
  local wake = qp .. 'ready-wake'  -- a selector's job: any admitter may match
  if selector == '' then wake = wake .. ':' .. group end  -- a group's job: only its admitters
  redis.call('LPUSH', wake, 1)
  redis.call('LTRIM', wake, 0, 63)
  redis.call('PEXPIRE', wake, 60000)
end

local function matches(labels, selector)
  if type(labels) ~= 'table' then return false end
  for pair in string.gmatch(selector, '[^,]+') do
    local k, v = string.match(pair, '^([^=]*)=(.*)$')
    if labels[k] ~= v then return false end
  end
  return true
end

local function target_alive(qp, queue, group, selector, healthy_ms)
  local members = redis.call('HGETALL', qp .. 'members')
  for m = 1, #members, 2 do
    local beat = redis.call('ZSCORE', ARGV[4], queue .. '|' .. members[m])
    if beat and now_n - tonumber(beat) < healthy_ms then
      local ok, d = pcall(cjson.decode, members[m + 1])
      if ok and type(d) == 'table' then
        if selector ~= '' then
          if matches(d.labels, selector) then return true end
        elseif (d.group or '') == group then
          return true
        end
      end
    end
  end
  return false
end

local function event(kind, queue, engine, id, task, error, tags)
  if tags == '' then  -- no table to build and unpack: this runs once per job
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'type', kind, 'ts', now, 'queue', queue,
      'backend', engine, 'job_id', id, 'task', task, 'attempt', '0', 'worker_id', '', 'duration_ms', '',
      'error', error)
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'type', kind, 'ts', now, 'queue', queue,
      'backend', engine, 'job_id', id, 'task', task, 'attempt', '0', 'worker_id', '', 'duration_ms', '',
      'error', error, 'tags', tags)
  end
end

local FRESH = {false, false}  -- the record of a fresh id in a chained call: none
local engine_queues = {}  -- queue prefix -> true when its batched jobs go to the engine
local route_flags = {}  -- queue prefix -> {paused, routed}: read once per call
local shapes = {}
local i = 6
for s = 1, tonumber(ARGV[5]) do
  shapes[s] = {unpack(ARGV, i, i + 17)}
  i = i + 18
end
local njobs = tonumber(ARGV[i])
i = i + 1
for _ = 1, njobs do
  local id, run, envelope, shape = ARGV[i], ARGV[i + 1], ARGV[i + 2], shapes[tonumber(ARGV[i + 3])]
  local delay, ncmds = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  i = i + 6
  local task, queue, engine, delayed_key, wake_key = shape[1], shape[2], shape[3], shape[4], shape[5]
  local batched, qp, routed = shape[6] == '1', shape[7], shape[8] == '1'
  local priority, group, selector, limited, fallback = shape[9], shape[10], shape[11], shape[12], shape[13]
  local healthy_ms, keep, dead_ttl = tonumber(shape[14]), tonumber(shape[15]), tonumber(shape[16])
  local tags, chosen = shape[17], shape[18] == '1'
  local job_key, result_key = ARGV[2] .. id, nil  -- result_key: only where a result is replaced or written
  local cmds = nil  -- a job's own engine commands (a caller-chosen id): read only when there are some
  if ncmds > 0 then
    cmds = {}
    for c = 1, ncmds do
      cmds[c], i = read_command(i)
    end
  end
  local job = FRESH
  if chosen or not chain then job = redis.call('HMGET', job_key, 'status', 'run') end
  local status = job[1]
  if job[2] == run then
    out[#out + 1] = 2
  elseif status == 'queued' or status == 'delayed' or status == 'running' then
    out[#out + 1] = 0
  else
    event('job.enqueued', queue, engine, id, task, '', tags)
    if status or chosen then  -- a fresh id has no old record or result to replace
      result_key = ARGV[3] .. id
      redis.call('DEL', job_key, result_key)
    end
    local flags = route_flags[qp]
    if not flags then
      flags = redis.call('HMGET', qp .. 'route', 'paused', 'routed')
      route_flags[qp] = flags
    end
    if routed then
      if flags[2] ~= '1' then
        redis.call('HSET', qp .. 'route', 'routed', 1)
        flags[2] = '1'
      end
    elseif flags[1] == '1' or flags[2] == '1' then
      routed = true
    end
    local ended = nil
    if (group ~= '' or selector ~= '') and fallback ~= 'wait' and not target_alive(qp, queue, group, selector, healthy_ms) then
      ended = fallback
    end
    if ended then
      result_key = ARGV[3] .. id
      local target = "group '" .. group .. "'"
      if selector ~= '' then target = "labels " .. selector end
      local status_end, kind = 'failed', 'NoWorker'
      if ended == 'cancel' then
        status_end, kind = 'cancelled', 'Cancelled'
      else
        keep = math.max(keep, dead_ttl)
        redis.call('ZREMRANGEBYSCORE', qp .. 'dead', '-inf', now_n - dead_ttl * 1000)
        redis.call('ZADD', qp .. 'dead', now_n, id)
      end
      local reason = 'no healthy worker of ' .. target .. ' on queue ' .. queue .. ' (fallback=' .. ended .. ')'
      redis.call('HSET', job_key, 'status', status_end, 'attempt', 0, 'queue', queue, 'task', task,
        'envelope', envelope, 'enqueued_at', now, 'engine', engine, 'run', run, 'finished_at', now)
      redis.call('EXPIRE', job_key, keep)
      redis.call('SET', result_key, cjson.encode({job_id = id, queue = queue, task = task, status = status_end,
        attempts = 0, engine = engine, enqueued_at = now_n, finished_at = now_n, error_type = kind,
        error = reason}), 'EX', keep)
      event('job.failed', queue, engine, id, task, kind .. ': ' .. reason, tags)
      out[#out + 1] = 3
    else
      local new_status = 'queued'
      if delay > 0 then new_status = 'delayed' end
      redis.call('HSET', job_key, 'status', new_status, 'attempt', 0, 'queue', queue, 'task', task,
        'envelope', envelope, 'enqueued_at', now, 'engine', engine, 'run', run)
      if delay > 0 then
        local due = now_n + delay
        redis.call('ZADD', delayed_key, string.format('%.0f', due), envelope)
        local first = redis.call('ZRANGE', delayed_key, 0, 0, 'WITHSCORES')
        if tonumber(first[2]) >= due then
          redis.call('LPUSH', wake_key, 1)
          redis.call('LTRIM', wake_key, 0, 0)
          redis.call('PEXPIRE', wake_key, 60000)
        end
      elseif routed then
        place(qp, envelope, priority, group, selector, limited)
      else
        if cmds then
          for _, cmd in ipairs(cmds) do
            redis.call(unpack(cmd))
          end
        end
        if batched then engine_queues[qp] = true end
      end
      out[#out + 1] = 1
    end
  end
end
local nblocks = tonumber(ARGV[i] or '0')
i = i + 1
for _ = 1, nblocks do
  local qp, ncmds = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local run = engine_queues[qp]
  for _ = 1, ncmds do
    local nwords = tonumber(ARGV[i])
    if run then redis.call(unpack(ARGV, i + 1, i + nwords)) end
    i = i + 1 + nwords
  end
end
if chain then
  redis.call('HSET', chain, position, table.concat(out), 'last', position)
  redis.call('PEXPIRE', chain, 600000)
end
return out
