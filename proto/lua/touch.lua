-- touch.lua: record viewer access for a batch of channels at Redis TIME (one call per flush).
-- Any node that answered a viewer counts the access, wherever the channel runs: only channels that
-- have an owner are stamped (an access entry never outlives its lease).
-- KEYS[1] access farm:access (zset channel -> last access ms)
-- KEYS[2..n+1] farm:owner:<id> of each channel, in ARGV's order
-- ARGV channel ids
-- Returns the Redis time used, in ms (-1: farm:access has the wrong type, nothing was stamped).
-- ZADD GT: an access time never moves backwards.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ty = redis.call('TYPE', KEYS[1]).ok
if ty ~= 'zset' and ty ~= 'none' then
  -- Wrong type (an operator's mistake): nothing is stamped; the coordinator repairs it.
  return -1
end
local args = {}
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    args[#args + 1] = now
    args[#args + 1] = ARGV[i]
  end
end
if #args > 0 then
  redis.call('ZADD', KEYS[1], 'GT', unpack(args))
end
return now
