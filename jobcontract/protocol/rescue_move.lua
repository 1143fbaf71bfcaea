-- Moves one entry only if it is still pending to the rescuer (a janitor may have taken it back).
-- KEYS: source stream, destination stream, the destination queue's partition set. ARGV: group, entry id,
-- the message for its new queue, its partition ('' for the destination queue's own stream).
-- #include entry.lua
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  add_partition_entry(KEYS[2], KEYS[3], ARGV[4], ARGV[3], 0)
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
