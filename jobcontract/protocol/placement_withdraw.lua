-- KEYS: the placement records hash, its until set. ARGV: workers whose records go (a stopping worker).
redis.call('HDEL', KEYS[1], unpack(ARGV))
return redis.call('ZREM', KEYS[2], unpack(ARGV))
