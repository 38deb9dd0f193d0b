-- renew.lua: extend an owner lease only if we still hold it (compare-and-pexpire).
-- KEYS[1] owner farm:owner:<id>
-- ARGV[1] expected value "<node>:<gen>", ARGV[2] lease ms
-- Returns 1 when renewed, 0 when the lease is gone or held by another owner (the caller is fenced).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
