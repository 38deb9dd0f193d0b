-- reconcile.lua: the leader drops runtime keys of one channel that no lease of <node> backs any more.
-- KEYS[1] leader  farm:leader
-- KEYS[2] owner   farm:owner:<id>
-- KEYS[3] streams farm:node:<node>:streams
-- KEYS[4] stream  farm:stream:<id>
-- KEYS[5] load    farm:node:<node>:load (the weight goes with the set entry)
-- ARGV[1] leader value, ARGV[2] node id, ARGV[3] channel id
-- Nothing happens while <node> holds the lease. Otherwise the node's set entry goes and, when nobody
-- holds the lease, the stream hash too if it names <node> and is not a kept final state (those have a
-- TTL). Returns what was removed: "" nothing, "u" the set entry, "s" the stream hash, "us" both;
-- or 'notleader'.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'notleader'
end
local cur = redis.call('GET', KEYS[2])
if cur and string.sub(cur, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':' then
  return ''
end
-- A lease deleted by hand while its node still runs the channel: the stream hash's lease_until
-- keeps claims away until that node noticed and fenced; it is not stale before then.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('TYPE', KEYS[4]).ok == 'hash'
  and redis.call('HGET', KEYS[4], 'node') == ARGV[2]
  and (tonumber(redis.call('HGET', KEYS[4], 'lease_until')) or 0) > now then
  return ''
end
local out = ''
if redis.call('SREM', KEYS[3], ARGV[3]) == 1 then
  out = out .. 'u'
end
redis.call('HDEL', KEYS[5], ARGV[3])
if not cur and redis.call('HGET', KEYS[4], 'node') == ARGV[2] and redis.call('PTTL', KEYS[4]) == -1 then
  redis.call('DEL', KEYS[4])
  out = out .. 's'
end
return out
