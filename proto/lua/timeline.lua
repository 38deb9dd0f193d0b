-- timeline.lua: record a channel's published HLS timeline, only while we hold its lease.
-- The owner calls it before it publishes new segments, so the recorded playlist is never behind
-- what a viewer was given, and a new owner continues the media sequence after `last`.
-- KEYS[1] owner    farm:owner:<id>
-- KEYS[2] timeline farm:timeline:<id>   (hash: target, last, disc, gen, at, playlist)
-- ARGV[1] expected "<node>:<gen>", ARGV[2] gen, ARGV[3] target duration (s),
-- ARGV[4] media sequence number of the newest published segment, ARGV[5] its discontinuity number,
-- ARGV[6] the playlist text, ARGV[7] ms to keep the record after the last write
-- Returns 1 when recorded, 0 when the lease is not ours (nothing is written: the caller is fenced).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[2], 'gen', ARGV[2], 'target', ARGV[3], 'last', ARGV[4], 'disc', ARGV[5],
  'at', now, 'playlist', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return 1
