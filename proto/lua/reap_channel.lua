-- reap_channel.lua: the leader releases one channel of a dead node.
-- KEYS[1] leader  farm:leader
-- KEYS[2] alive   farm:node:<node>:alive    (must be gone: a node that came back is not reaped)
-- KEYS[3] owner   farm:owner:<id>
-- KEYS[4] streams farm:node:<node>:streams
-- KEYS[5] stream  farm:stream:<id>
-- KEYS[6] access  farm:access
-- KEYS[7] conns   farm:provider:<name>:conns (the channel's provider holdings; unused without one)
-- KEYS[8] load    farm:node:<node>:load     (channel weights)
-- ARGV[1] leader value, ARGV[2] node id, ARGV[3] channel id, ARGV[4] "1" when KEYS[7] is a provider key
-- (The access entry goes too, also for a channel the leader re-homes: the new owner's claim stamps
-- it, and a re-home start that is refused, at a provider's limit say, leaves nothing behind.)
-- The lease and hash go only while they still name the node; access and provider holdings only while
-- no other node owns the channel. Returns 'released' (the node's lease was deleted), 'cleared' (only
-- leftovers), 'alive', 'notleader'.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'notleader'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'alive'
end
redis.call('SREM', KEYS[4], ARGV[3])
redis.call('HDEL', KEYS[8], ARGV[3])
local cur = redis.call('GET', KEYS[3])
local mine = cur and string.sub(cur, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':'
if mine then
  redis.call('DEL', KEYS[3])
end
if redis.call('HGET', KEYS[5], 'node') == ARGV[2] then
  redis.call('DEL', KEYS[5])
end
if mine or not cur then
  redis.call('ZREM', KEYS[6], ARGV[3])
  if ARGV[4] == '1' then
    redis.call('ZREM', KEYS[7], ARGV[3])
  end
end
if mine then
  return 'released'
end
return 'cleared'
