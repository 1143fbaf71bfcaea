-- Moves one entry only if it is still pending to the rescuer (a janitor may have taken it back).
-- KEYS: source stream, destination stream. ARGV: group, entry id, the message for its new queue.
-- #include entry.lua
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  add_entry(KEYS[2], ARGV[3], 0)
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
