-- admit: give a run one of its workflow's max_active_runs slots, if one is free.
-- KEYS[1] set of the workflow's runs holding a slot   ARGV[1] run id   ARGV[2] max_active_runs
-- Returns 1 when the run holds a slot (now or already), 0 when all are taken.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
return 0
