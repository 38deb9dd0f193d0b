-- claim.lua: take ownership of a channel for one node.
-- KEYS[1] owner      farm:owner:<id>               (string, PX lease)
-- KEYS[2] gen        farm:gen:<id>                 (counter, fencing token)
-- KEYS[3] streams    farm:node:<node>:streams      (set of channels the node runs)
-- KEYS[4] stream     farm:stream:<id>              (hash, runtime state)
-- KEYS[5] access     farm:access                   (zset channel -> last access ms)
-- KEYS[6] provider   farm:provider:<name>          (hash: max_connections; unused without a provider)
-- KEYS[7] conns      farm:provider:<name>:conns    (zset channel -> holding expiry ms)
-- KEYS[8] load       farm:node:<node>:load         (hash channel -> weight)
-- KEYS[9] recovering farm:recovering               (no claims while it exists)
-- KEYS[10] alive     farm:node:<node>:alive        (the claimer must be alive as Redis sees it)
-- ARGV[1] node id, ARGV[2] lease ms, ARGV[3] node capacity (0 = unlimited), ARGV[4] channel id,
-- ARGV[5] provider name ("" = none), ARGV[6] the channel's weight (a copy 1, a transcode more)
-- Returns {"ok", gen} | {"owned", "<node>:<gen>"} | {"full", running} | {"provider_full", max}
--       | {"recovering", ""} (Redis lost keys moments ago; retry shortly)
--       | {"busy", node} (the owner key is gone but the stream hash says that node's lease would
--         still run: it may still run FFmpeg until its next renewal finds the lease gone and fences;
--         nobody claims before that, so a channel never runs twice)
local cur = redis.call('GET', KEYS[1])
if cur then
  return {'owned', cur}
end
if redis.call('EXISTS', KEYS[9]) == 1 then
  return {'recovering', 'window'}
end
if redis.call('EXISTS', KEYS[10]) == 0 then
  return {'recovering', 'not_alive'}
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('TYPE', KEYS[4]).ok == 'hash' then
  local prev = redis.call('HMGET', KEYS[4], 'node', 'lease_until')
  if prev[1] and prev[1] ~= ARGV[1] and (tonumber(prev[2]) or 0) > now then
    return {'busy', prev[1]}
  end
end
local cap = tonumber(ARGV[3])
local weight = tonumber(ARGV[6]) or 1
if cap > 0 then
  -- The set is the truth; the load hash only supplies weights (a stale entry never counts).
  local load = 0
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    load = load + (tonumber(redis.call('HGET', KEYS[8], m)) or 1)
  end
  if load + weight > cap then
    return {'full', tostring(load)}
  end
end
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
redis.call('HSET', KEYS[8], ARGV[4], weight)
-- A start counts as an access: a channel started but never watched goes idle like any other.
-- (A wrong-typed farm:access, an operator's mistake, is the coordinator's to repair: no stamp.)
local access_type = redis.call('TYPE', KEYS[5]).ok
if access_type == 'zset' or access_type == 'none' then
  redis.call('ZADD', KEYS[5], 'GT', now, ARGV[4])
end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'node', ARGV[1], 'gen', gen, 'state', 'starting', 'started_at', now,
  'restarts', 0, 'pid', '', 'pid_start', '', 'source', '', 'last_error', '', 'last_segment_at', '',
  'provider', ARGV[5], 'lease_until', now + lease)
return {'ok', tostring(gen)}
