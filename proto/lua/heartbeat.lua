-- heartbeat.lua: a node says it is alive, and learns whether Redis lost its keys.
-- KEYS[1] node       farm:node:<node>        (hash, the node's description)
-- KEYS[2] alive      farm:node:<node>:alive  (string, PX ttl; gone = dead)
-- KEYS[3] nodes      farm:nodes              (zset node -> last heartbeat ms)
-- KEYS[4] recovering farm:recovering         (string, PX: no claims while it exists)
-- KEYS[5] since      farm:since              (string, no TTL: Redis time of the first heartbeat
--                                             this data set saw; gone = Redis lost every key)
-- ARGV[1] node id, ARGV[2] ttl ms, ARGV[3] incarnation, ARGV[4] "1" when this incarnation has
-- heartbeated before, ARGV[5] "1" when it runs channels, ARGV[6] lease ms,
-- ARGV[7] the Redis time (ms) the node expects now ("" before its first reply), ARGV[8] how late
-- (ms) a heartbeat may arrive, then field, value pairs.
-- A heartbeat that arrives later than that (it sat in a partitioned link and was delivered when it
-- healed) is stale: it changes nothing and answers {now, 0, 0, 1}.
-- Returns {now ms, lost, repaired}: repaired counts the node's own wrong-typed keys replaced (plus
-- 100 when farm:nodes has the wrong type: not touched here). lost = 1 when the node's alive key had vanished although it heartbeated
-- before (Redis restarted empty or lost writes; or the node was reaped). It then opens a recovery
-- window of one lease TTL in which nobody may claim, so that every old owner notices and fences
-- before another node takes its channels: when this node runs channels, and also when farm:since is
-- gone, because then every node's leases went with it, and the first node to notice may be one
-- that runs nothing while another still runs FFmpegs it no longer holds a lease for.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[7] ~= '' and now - tonumber(ARGV[7]) > tonumber(ARGV[8]) then
  return {now, 0, 0, 1}
end
-- The node's own keys: a wrong-typed one (an operator's mistake) is replaced, not an outage.
local repaired = 0
local function own(key, want)
  local ty = redis.call('TYPE', key).ok
  if ty ~= want and ty ~= 'none' then
    redis.call('DEL', key)
    repaired = repaired + 1
  end
end
own(KEYS[1], 'hash')
own(KEYS[2], 'string')
if redis.call('TYPE', KEYS[3]).ok ~= 'zset' and redis.call('TYPE', KEYS[3]).ok ~= 'none' then
  -- farm:nodes is everyone's: left for the coordinator to report and repair; this heartbeat
  -- still records the node's own keys.
  repaired = repaired + 100
end
local lost = 0
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  lost = 1
  if ARGV[5] == '1' or redis.call('EXISTS', KEYS[5]) == 0 then
    redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[6], 'NX')
  end
end
redis.call('SET', KEYS[5], now, 'NX')
local args = {}
for i = 9, #ARGV do
  args[#args + 1] = ARGV[i]
end
args[#args + 1] = 'heartbeat_at'
args[#args + 1] = now
redis.call('HSET', KEYS[1], unpack(args))
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
if repaired < 100 then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
end
return {now, lost, repaired, 0}
