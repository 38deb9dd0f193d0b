-- pin.lua: set or clear a catalog channel's `pinned` flag, only if the channel exists, and keep the
-- pinned index in step.
-- KEYS[1] channel farm:channel:<id>
-- KEYS[2] pinned  farm:pinned (set of pinned channel ids)
-- ARGV[1] "1" to pin, "0" to unpin, ARGV[2] channel id
-- Returns 1 when written, 0 when the channel is not in the catalog (nothing is created).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'pinned', ARGV[1])
if ARGV[1] == '1' then
  redis.call('SADD', KEYS[2], ARGV[2])
else
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
