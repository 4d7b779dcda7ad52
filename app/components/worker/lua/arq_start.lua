-- arq_start: arq's start_jobs check-and-take of one queued job, in one round trip instead of
-- four (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC), with the same outcome: a job is taken only
-- when no worker holds its in-progress key and it is still in the queue.
-- KEYS[1] the job's in-progress key   KEYS[2] the queue's sorted set
-- ARGV[1] job id   ARGV[2] in-progress lease, ms
-- Returns the job's score (its enqueue time, as a string) when taken, false otherwise.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score then
  return false
end
redis.call('PSETEX', KEYS[1], ARGV[2], '1')
return score
