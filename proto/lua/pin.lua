-- pin.lua: set or clear a catalog channel's `pinned` flag, only if the channel exists.
-- KEYS[1] channel farm:channel:<id>
-- ARGV[1] "1" to pin, "0" to unpin
-- Returns 1 when written, 0 when the channel is not in the catalog (nothing is created).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'pinned', ARGV[1])
return 1
