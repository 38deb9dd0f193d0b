-- leader.lua: acquire or renew coordinator leadership.
-- KEYS[1] leader farm:leader        (string, PX lease: "<coordinator>:<epoch>")
-- KEYS[2] epoch  farm:leader:epoch  (counter: the leader's fencing token, INCR on every acquisition)
-- ARGV[1] coordinator id, ARGV[2] lease ms, ARGV[3] the value the caller believes it holds ("" for none)
-- Returns {"renewed", value} | {"acquired", value} | {"follower", value of the leader, its PTTL in ms}
-- A renewal is a compare-and-pexpire: a coordinator whose lease expired and was taken cannot renew it.
local cur = redis.call('GET', KEYS[1])
if cur then
  if ARGV[3] ~= '' and cur == ARGV[3] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {'renewed', cur}
  end
  return {'follower', cur, tostring(redis.call('PTTL', KEYS[1]))}
end
local epoch = redis.call('INCR', KEYS[2])
local v = ARGV[1] .. ':' .. epoch
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
return {'acquired', v}
