-- renew.lua: extend an owner lease only if we still hold it (compare-and-pexpire), and with it the
-- channel's provider holding.
-- KEYS[1] owner farm:owner:<id>
-- KEYS[2] conns farm:provider:<name>:conns (optional: only when the channel has a provider)
-- ARGV[1] expected value "<node>:<gen>", ARGV[2] lease ms, ARGV[3] channel id (with KEYS[2])
-- Returns 1 when renewed, 0 when the lease is gone or held by another owner (the caller is fenced).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if KEYS[2] then
    local t = redis.call('TIME')
    local now = t[1] * 1000 + math.floor(t[2] / 1000)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
  end
  return 1
end
return 0
