-- release_node.lua: a node's new incarnation (or a reaper) clears what an old incarnation left for one channel.
-- KEYS[1] owner   farm:owner:<id>
-- KEYS[2] streams farm:node:<node>:streams
-- KEYS[3] stream  farm:stream:<id>
-- KEYS[4] load    farm:node:<node>:load
-- KEYS[5] access  farm:access (its entry goes with a released lease)
-- ARGV[1] node id, ARGV[2] channel id
-- Only touches the lease and hash when they still name that node. Returns 1 when a lease was released.
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
local released = 0
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ':' then
  redis.call('DEL', KEYS[1])
  released = 1
end
if not redis.call('GET', KEYS[1]) and KEYS[5] then
  local ty = redis.call('TYPE', KEYS[5]).ok
  if ty == 'zset' then
    redis.call('ZREM', KEYS[5], ARGV[2])
  end
end
if redis.call('HGET', KEYS[3], 'node') == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
return released
