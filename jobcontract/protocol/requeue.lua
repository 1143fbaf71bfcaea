-- KEYS: stream, dead letters. ARGV: group, max redeliveries, then entry ids.
-- #include move.lua
local moved = 0
for i = 3, #ARGV do
  moved = moved + move(KEYS[1], ARGV[1], ARGV[i], tonumber(ARGV[2]), KEYS[2])
end
return moved
