-- dead_release: take a retried job out of its queue's dead set, once its new run is accepted.
-- KEYS[1] dead set of the queue   KEYS[2] job hash
-- ARGV[1] job id
-- The entry goes only while it is the old failure's: scored before the job's current run was
-- enqueued (Redis's clock on both sides). When the new run has already failed again,
-- finish.lua put the job back with a later score, and that entry stays.
-- Returns 1 when removed, 0 when left (not there, or the new run's own failure).
local enqueued_at = redis.call('HGET', KEYS[2], 'enqueued_at')
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or not enqueued_at or tonumber(score) >= tonumber(enqueued_at) then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
