-- command.lua: a command from the leader to one node (fenced by the leader lease).
-- KEYS[1] leader farm:leader
-- KEYS[2] cmd    farm:cmd:<node>
-- ARGV[1] leader value, ARGV[2] MAXLEN (~), then field, value pairs (op, channel, gen, reason, by)
-- Returns the entry id, or false when the caller no longer leads (nothing is written).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
local args = {}
for i = 3, #ARGV do
  args[#args + 1] = ARGV[i]
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(args))
