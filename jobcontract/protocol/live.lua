-- How many workers of a pool are vouched alive now: its sorted set scores each worker with the
-- Redis-clock instant (µs) until which it is vouched for (see vouch.lua).
-- #include now.lua
local function live_workers(pool)
  return redis.call('ZCOUNT', pool, now, '+inf')
end
