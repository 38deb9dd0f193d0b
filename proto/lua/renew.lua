-- renew.lua: extend an owner lease only if we still hold it (compare-and-pexpire), and with it the
-- channel's provider holding.
-- KEYS[1] owner  farm:owner:<id>
-- KEYS[2] stream farm:stream:<id>    (its lease_until follows the lease: a claim waits for it)
-- KEYS[3] conns  farm:provider:<name>:conns (optional: only when the channel has a provider)
-- ARGV[1] expected value "<node>:<gen>", ARGV[2] lease ms, ARGV[3] channel id (with KEYS[3]),
-- ARGV[4] the Redis time (ms) the node expects now ("" unknown), ARGV[5] how late (ms) it may
-- arrive: a later renewal (delivered when a partition healed) renews nothing and answers 0.
-- Returns 1 when renewed, 0 when the lease is gone or held by another owner (the caller is fenced).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[4] and ARGV[4] ~= '' and now - tonumber(ARGV[4]) > tonumber(ARGV[5]) then
  return 0
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if redis.call('TYPE', KEYS[2]).ok == 'hash' then
    redis.call('HSET', KEYS[2], 'lease_until', now + tonumber(ARGV[2]))
  end
  if KEYS[3] then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3])
  end
  return 1
end
return 0
