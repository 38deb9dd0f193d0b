-- leader_release.lua: give leadership up, only if we still hold it (compare-and-delete).
-- KEYS[1] leader farm:leader
-- ARGV[1] expected value "<coordinator>:<epoch>"
-- Returns 1 when released, 0 when the lease was not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
