-- KEYS: sorted sets indexing one kind of object (a listing by creation time, a tenant's file sizes).
-- ARGV: member, ttl_s, the prefix of the objects' keys (`{ns}:file:`), the suffix of a second key
-- that also keeps an object alive ('' for none: a file being uploaded has only its content yet),
-- how many of the lowest-scored members to check, then one score per key.
-- Adds the member, drops the checked members whose object is gone (they expired or were deleted),
-- and keeps the index for ttl_s, never shortening it: every write prunes more than it adds, and an
-- index nobody writes to any more expires after the objects it names.
local member, ttl, prefix, suffix, probe = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local function alive(id)
  if redis.call('EXISTS', prefix .. id) == 1 then return true end
  return suffix ~= '' and redis.call('EXISTS', prefix .. id .. suffix) == 1
end
local dropped = 0
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[5 + i], member)
  for _, id in ipairs(redis.call('ZRANGE', key, 0, probe - 1)) do
    if id ~= member and not alive(id) then
      redis.call('ZREM', key, id)
      dropped = dropped + 1
    end
  end
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
return dropped
