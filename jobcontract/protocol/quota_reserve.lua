-- KEYS: a key's set of unfinished ids. ARGV: bound, id, ttl_s.
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], redis.call('TIME')[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
