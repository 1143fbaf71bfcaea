-- A lease is taken when free or already ours, and kept alive by its holder.
-- KEYS: lease. ARGV: owner, ttl_ms.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
