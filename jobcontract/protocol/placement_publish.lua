-- KEYS: the placement records hash, its until set. ARGV: ttl_ms, worker, record (JSON).
-- A worker's record (its budget, the models it serves, loads and their sizes) holds until now + ttl on
-- the Redis clock, like a pool's liveness (vouch.lua); records nobody renewed in time are dropped.
-- #include now.lua
local ttl = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl * 1000, ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #expired > 0 then
  redis.call('HDEL', KEYS[1], unpack(expired))
  redis.call('ZREM', KEYS[2], unpack(expired))
end
return #expired
