-- claim.lua: take ownership of a channel for one node.
-- KEYS[1] owner      farm:owner:<id>               (string, PX lease)
-- KEYS[2] gen        farm:gen:<id>                 (counter, fencing token)
-- KEYS[3] streams    farm:node:<node>:streams      (set of channels the node runs)
-- KEYS[4] stream     farm:stream:<id>              (hash, runtime state)
-- KEYS[5] access     farm:access                   (zset channel -> last access ms)
-- KEYS[6] provider   farm:provider:<name>          (hash: max_connections; unused without a provider)
-- KEYS[7] conns      farm:provider:<name>:conns    (zset channel -> holding expiry ms)
-- ARGV[1] node id, ARGV[2] lease ms, ARGV[3] node capacity (0 = unlimited), ARGV[4] channel id,
-- ARGV[5] provider name ("" = none)
-- Returns {"ok", gen} | {"owned", "<node>:<gen>"} | {"full", running} | {"provider_full", max}
local cur = redis.call('GET', KEYS[1])
if cur then
  return {'owned', cur}
end
local cap = tonumber(ARGV[3])
if cap > 0 then
  local running = redis.call('SCARD', KEYS[3])
  if running >= cap then
    return {'full', tostring(running)}
  end
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[2])
if ARGV[5] ~= '' then
  -- Holdings are leases: a dead node's expire by themselves; never a counter that drifts.
  local max = tonumber(redis.call('HGET', KEYS[6], 'max_connections') or '0') or 0
  if max > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
    if not redis.call('ZSCORE', KEYS[7], ARGV[4]) and redis.call('ZCARD', KEYS[7]) >= max then
      return {'provider_full', tostring(max)}
    end
  end
  redis.call('ZADD', KEYS[7], now + lease, ARGV[4])
end
local gen = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. gen, 'PX', lease)
redis.call('SADD', KEYS[3], ARGV[4])
-- A start counts as an access: a channel started but never watched goes idle like any other.
redis.call('ZADD', KEYS[5], 'GT', now, ARGV[4])
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'node', ARGV[1], 'gen', gen, 'state', 'starting', 'started_at', now,
  'restarts', 0, 'pid', '', 'pid_start', '', 'source', '', 'last_error', '', 'last_segment_at', '',
  'provider', ARGV[5])
return {'ok', tostring(gen)}
