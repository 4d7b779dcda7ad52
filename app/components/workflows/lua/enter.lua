-- enter: try to become the one who advances a run now.
-- KEYS[1] lock of the run   KEYS[2] dirty flag of the run
-- ARGV[1] token of the caller   ARGV[2] lease ms
-- The dirty flag is set first: if another process holds the lock, it sees the flag when it
-- leaves and advances the run once more, so a wake-up is never lost to a busy lock.
-- Returns 1 when the caller holds the lock (and the flag is cleared), 0 when someone else does.
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[2]))
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
