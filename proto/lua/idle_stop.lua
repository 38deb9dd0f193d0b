-- idle_stop.lua: the leader's idle decision for one channel, re-checked atomically.
-- KEYS[1] leader  farm:leader               (must still hold ARGV[1]: a deposed leader cannot act)
-- KEYS[2] owner   farm:owner:<id>
-- KEYS[3] access  farm:access               (zset channel -> last access ms)
-- KEYS[4] channel farm:channel:<id>         (catalog: pinned)
-- KEYS[5] cmd     farm:cmd:<node>           (command stream of the owner seen in ARGV[4]; unused without one)
-- ARGV[1] leader value, ARGV[2] channel id, ARGV[3] cutoff ms (idle when the last access is older),
-- ARGV[4] owner value the caller saw ("" for none), ARGV[5] command stream MAXLEN (~), ARGV[6] by
-- Returns 'stop' (stop command with the owner's gen sent), 'dropped' (no owner: the stale access entry
-- was removed), 'pinned', 'fresh' (accessed since, or no entry), 'changed' (owner changed since the
-- caller looked), 'notleader'.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'notleader'
end
local score = redis.call('ZSCORE', KEYS[3], ARGV[2])
if not score or tonumber(score) >= tonumber(ARGV[3]) then
  return 'fresh'
end
local cur = redis.call('GET', KEYS[2])
if (cur or '') ~= ARGV[4] then
  return 'changed'
end
if not cur then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return 'dropped'
end
local pinned = redis.call('HGET', KEYS[4], 'pinned')
if pinned == '1' or pinned == 'true' then
  return 'pinned'
end
local gen = string.match(cur, ':(%d+)$') or ''
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*',
  'op', 'stop', 'channel', ARGV[2], 'gen', gen, 'reason', 'idle', 'by', ARGV[6])
return 'stop'
