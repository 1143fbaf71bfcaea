-- Only a record that still exists is marked: marking an expired one would leave a key without a TTL.
-- KEYS: job records. ARGV: the field to set.
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, ARGV[1], '1') end
end
return #KEYS
