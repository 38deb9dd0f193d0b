-- release.lua: give a channel up, only if we still hold its lease (compare-and-delete).
-- KEYS[1] owner   farm:owner:<id>
-- KEYS[2] streams farm:node:<node>:streams
-- KEYS[3] stream  farm:stream:<id>
-- KEYS[4] access  farm:access
-- KEYS[5] load    farm:node:<node>:load
-- KEYS[6] timeline farm:timeline:<id> (its playlist is dropped: a stopped channel's window is never
--                 served as a held playlist; target, last and disc stay for the next start)
-- KEYS[7] conns   farm:provider:<name>:conns (optional: only when the channel has a provider)
-- ARGV[1] expected "<node>:<gen>", ARGV[2] channel id,
-- ARGV[3] final state ("" deletes the stream hash), ARGV[4] last_error, ARGV[5] ms to keep the final hash
-- Returns 1 when released, 0 when the lease was not ours (then only our own set entry is removed).
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[6], 'playlist')
if KEYS[7] then
  redis.call('ZREM', KEYS[7], ARGV[2])
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[3])
else
  redis.call('HSET', KEYS[3], 'state', ARGV[3], 'last_error', ARGV[4], 'pid', '', 'pid_start', '')
  redis.call('HDEL', KEYS[3], 'lease_until')
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return 1
