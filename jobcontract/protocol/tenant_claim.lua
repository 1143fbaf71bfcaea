-- KEYS: job. ARGV: tenant. Never creates a record (one that expired stays gone), never changes an owner.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'tenant', ARGV[1])
