-- KEYS: pool set, then one liveness key per worker. ARGV: ttl_ms, then names, then ready flags.
-- #include now.lua
local n = #KEYS - 1
local ttl = tonumber(ARGV[1])
for i = 1, n do
  redis.call('SET', KEYS[i + 1], '1', 'PX', ttl)
  if ARGV[1 + n + i] == '1' then
    redis.call('ZADD', KEYS[1], now + ttl * 1000, ARGV[1 + i])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return n
