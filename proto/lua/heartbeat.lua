-- heartbeat.lua: a node says it is alive.
-- KEYS[1] node  farm:node:<node>        (hash, the node's description)
-- KEYS[2] alive farm:node:<node>:alive  (string, PX ttl; gone = dead)
-- KEYS[3] nodes farm:nodes              (zset node -> last heartbeat ms)
-- ARGV[1] node id, ARGV[2] ttl ms, ARGV[3] incarnation, then field, value pairs for the node hash
-- Returns the Redis time in ms.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local args = {}
for i = 4, #ARGV do
  args[#args + 1] = ARGV[i]
end
args[#args + 1] = 'heartbeat_at'
args[#args + 1] = now
redis.call('HSET', KEYS[1], unpack(args))
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[1])
return now
