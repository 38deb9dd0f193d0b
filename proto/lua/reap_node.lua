-- reap_node.lua: the leader removes a dead node's own keys, once its channels are released.
-- KEYS[1] leader  farm:leader
-- KEYS[2] node    farm:node:<node>          (hash)
-- KEYS[3] alive   farm:node:<node>:alive
-- KEYS[4] nodes   farm:nodes                (zset node -> last heartbeat ms)
-- KEYS[5] streams farm:node:<node>:streams
-- KEYS[6] cmd     farm:cmd:<node>           (its command stream, deleted with its consumer group)
-- KEYS[7] load    farm:node:<node>:load     (channel weights)
-- ARGV[1] leader value, ARGV[2] node id, ARGV[3] cutoff ms: the last heartbeat must be older than this
-- Returns 'reaped', 'alive' (alive key back or a newer heartbeat), 'busy' (channels still listed), 'notleader'.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'notleader'
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 'alive'
end
local hb = redis.call('ZSCORE', KEYS[4], ARGV[2])
if hb and tonumber(hb) >= tonumber(ARGV[3]) then
  return 'alive'
end
if redis.call('SCARD', KEYS[5]) > 0 then
  return 'busy'
end
redis.call('DEL', KEYS[2], KEYS[5], KEYS[6], KEYS[7])
redis.call('ZREM', KEYS[4], ARGV[2])
return 'reaped'
