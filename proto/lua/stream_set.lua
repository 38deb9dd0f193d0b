-- stream_set.lua: a gen-checked write to a channel's runtime hash.
-- KEYS[1] owner  farm:owner:<id>
-- KEYS[2] stream farm:stream:<id>
-- ARGV[1] expected "<node>:<gen>", then field, value pairs. A value of "$now" is replaced by Redis TIME in ms.
-- Returns 1 when written, 0 when the writer is stale (its gen no longer owns the channel): nothing is written.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
-- The owner's own hash: a wrong-typed key (an operator's mistake) is replaced.
local ty = redis.call('TYPE', KEYS[2]).ok
if ty ~= 'hash' and ty ~= 'none' then
  redis.call('DEL', KEYS[2])
end
local t = redis.call('TIME')
local now = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
local args = {}
for i = 2, #ARGV, 2 do
  args[#args + 1] = ARGV[i]
  if ARGV[i + 1] == '$now' then
    args[#args + 1] = now
  else
    args[#args + 1] = ARGV[i + 1]
  end
end
if #args > 0 then
  redis.call('HSET', KEYS[2], unpack(args))
end
return 1
