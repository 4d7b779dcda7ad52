-- dead_purge: delete dead jobs: their dead-set entries, their records and their results.
-- KEYS[1] dead set of the queue
-- ARGV[1] job key prefix (job key = prefix .. id)   ARGV[2] result key prefix   ARGV[3..] job ids
-- A record is deleted only while it is still the failed one: an id enqueued again since (its
-- record queued, running or completed) loses its stale entry and keeps its record.
-- Returns how many entries were removed.
local removed = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    removed = removed + 1
    local status = redis.call('HGET', ARGV[1] .. id, 'status')
    if not status or status == 'failed' then
      redis.call('DEL', ARGV[1] .. id, ARGV[2] .. id)
    end
  end
end
return removed
