-- commit: write what one pass over a run decided, only while the caller still holds the
-- run's lock (a fence: a pass whose lease lapsed writes nothing).
-- KEYS[1] lock of the run
-- ARGV[1] token of the caller, then commands to the end of ARGV: k = word count, then the k
--   words of one Redis command; a word '$NOW' is replaced by Redis's time in ms.
-- Returns 1 when written, 0 when the lock is not the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local words = {}
  for j = 1, n do
    local w = ARGV[i + j]
    if w == '$NOW' then w = now end
    words[j] = w
  end
  redis.call(unpack(words))
  i = i + n + 1
end
return 1
