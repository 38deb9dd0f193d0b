-- leader.lua: acquire or renew coordinator leadership.
-- KEYS[1] leader farm:leader        (string, PX lease: "<coordinator>:<epoch>")
-- KEYS[2] epoch  farm:leader:epoch  (counter: the leader's fencing token, INCR on every acquisition)
-- ARGV[1] coordinator id, ARGV[2] lease ms, ARGV[3] the value the caller believes it holds ("" for none)
-- Returns {"renewed", value} | {"acquired", value} | {"follower", value of the leader, its PTTL in ms}
-- A renewal is a compare-and-pexpire: a coordinator whose lease expired and was taken cannot renew it.
-- Wrong-typed keys (an operator's mistake) would keep the farm leaderless: a wrong-typed lease is
-- no lease; a wrong-typed epoch starts again from Redis time in ms (above any count of acquisitions,
-- so fencing tokens still only grow).
local lt = redis.call('TYPE', KEYS[1]).ok
if lt ~= 'string' and lt ~= 'none' then
  redis.call('DEL', KEYS[1])
end
local et = redis.call('TYPE', KEYS[2]).ok
if et ~= 'string' and et ~= 'none' or (et == 'string' and not tonumber(redis.call('GET', KEYS[2]))) then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000))
end
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
