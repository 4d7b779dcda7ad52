-- finish: end a running attempt with its result, terminal status and events, exactly once.
-- KEYS[1] job hash   KEYS[2] result key   KEYS[3] held set of the owner instance   KEYS[4] events stream
-- ARGV[1] job id   ARGV[2] owner instance   ARGV[3] attempt   ARGV[4] status   ARGV[5] result record JSON
-- ARGV[6] keep seconds   ARGV[7] finished at (ms)   ARGV[8] events maxlen   ARGV[9..] events (JSON objects)
-- Returns 1 when written, 0 when that attempt is no longer running there: a retry of a write
-- whose reply was lost (a Redis restart) must not write the terminal event twice.
redis.call('SREM', KEYS[3], ARGV[1])
local job = redis.call('HMGET', KEYS[1], 'status', 'owner', 'attempt')
if job[1] ~= 'running' or job[2] ~= ARGV[2] or job[3] ~= ARGV[3] then
  return 0
end
local keep = tonumber(ARGV[6])
redis.call('SET', KEYS[2], ARGV[5], 'EX', keep)
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[7])
redis.call('EXPIRE', KEYS[1], keep)
for i = 9, #ARGV do
  local fields = {}
  for name, value in pairs(cjson.decode(ARGV[i])) do
    table.insert(fields, name)
    table.insert(fields, value)
  end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', unpack(fields))
end
return 1
