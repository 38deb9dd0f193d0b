-- handover.lua: move a channel's lease from a draining node to another node (make before break:
-- the draining node keeps its FFmpeg until the new owner runs, then stops it).
-- KEYS[1] owner        farm:owner:<id>
-- KEYS[2] gen          farm:gen:<id>
-- KEYS[3] from_streams farm:node:<from>:streams
-- KEYS[4] to_streams   farm:node:<to>:streams
-- KEYS[5] stream       farm:stream:<id>
-- KEYS[6] from_load    farm:node:<from>:load
-- KEYS[7] to_load      farm:node:<to>:load
-- ARGV[1] expected "<from>:<gen>", ARGV[2] to node, ARGV[3] lease ms, ARGV[4] channel id,
-- ARGV[5] to-node capacity (0 = unlimited), ARGV[6] the channel's weight
-- Returns {"ok", gen} | {"stale", current owner or ""} | {"full", running}
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then
  return {'stale', cur or ''}
end
local cap = tonumber(ARGV[5])
local weight = tonumber(ARGV[6]) or 1
if cap > 0 then
  local load = 0
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    load = load + (tonumber(redis.call('HGET', KEYS[7], m)) or 1)
  end
  if load + weight > cap then
    return {'full', tostring(load)}
  end
end
local gen = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('SET', KEYS[1], ARGV[2] .. ':' .. gen, 'PX', ARGV[3])
redis.call('SREM', KEYS[3], ARGV[4])
redis.call('HDEL', KEYS[6], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[7], ARGV[4], weight)
redis.call('HSET', KEYS[5], 'node', ARGV[2], 'gen', gen, 'state', 'starting', 'started_at', now,
  'restarts', 0, 'pid', '', 'pid_start', '', 'last_error', '', 'last_segment_at', '',
  'lease_until', now + tonumber(ARGV[3]))
return {'ok', tostring(gen)}
