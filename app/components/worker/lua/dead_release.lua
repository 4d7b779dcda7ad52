-- dead_release: take a retried job out of its queue's dead set, once its new run is accepted.
-- KEYS[1] dead set of the queue   KEYS[2] job hash
-- ARGV[1] job id
-- Called after the retry's enqueue was accepted, so the record is the new run's: the entry goes
-- unless that run has already ended failed (finish.lua then put the job back in the set, for
-- that failure, and it stays). No clock is compared: a failure and its retry in the same ms
-- are told apart by the record, not by scores.
-- Returns 1 when removed, 0 when left (not there, or the new run's own failure).
if redis.call('HGET', KEYS[2], 'status') == 'failed' then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
