-- repair_key.lua: the leader replaces a farm-wide key that an operator's mistake left with the wrong
-- type, when the farm can rebuild it (farm:access from claims and access flushes, farm:nodes from
-- heartbeats, farm:recovering, farm:since, farm:events); nothing else touches it meanwhile.
-- KEYS[1] leader farm:leader
-- KEYS[2] key    the farm-wide key
-- ARGV[1] leader value, ARGV[2] the type the farm keeps there (TYPE's answer)
-- Returns 'notleader' | 'ok' (the right type, or absent) | the type found (the key was deleted)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'notleader'
end
local ty = redis.call('TYPE', KEYS[2]).ok
if ty == ARGV[2] or ty == 'none' then
  return 'ok'
end
redis.call('DEL', KEYS[2])
return ty
