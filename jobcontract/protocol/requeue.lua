-- KEYS: stream (the queue's, or a tenant's lane of it), dead letters. ARGV: group, max redeliveries,
-- dead letters' max count and max age (ms, 0: none), queue name, then entry ids.
-- #include move.lua
local moved = 0
for i = 6, #ARGV do
  moved = moved + move(KEYS[1], ARGV[5], ARGV[1], ARGV[i], tonumber(ARGV[2]), KEYS[2], ARGV[3], ARGV[4])
end
return moved
