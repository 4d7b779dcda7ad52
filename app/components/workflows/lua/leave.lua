-- leave: stop advancing a run.
-- KEYS[1] lock of the run   KEYS[2] dirty flag of the run
-- ARGV[1] token of the caller
-- Returns 1 when someone asked for the run meanwhile (the caller should advance it again),
-- 0 when not, -1 when the caller no longer held the lock (its lease lapsed).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('DEL', KEYS[1])
return redis.call('DEL', KEYS[2])
