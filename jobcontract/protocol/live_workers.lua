-- KEYS: pool sets. Answers the number of live workers of each pool, in order.
-- #include live.lua
local counts = {}
for i, pool in ipairs(KEYS) do counts[i] = live_workers(pool) end
return counts
