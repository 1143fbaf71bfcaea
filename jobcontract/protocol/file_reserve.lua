-- KEYS: the tenant's file sizes, the tenant's listing index, the new file's content.
-- ARGV: file id, bytes, max files, max bytes, ttl_s, the prefix of file keys (`{ns}:file:`).
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local count, total = 0, 0
for i = 1, #members, 2 do
  local id = members[i]
  if redis.call('EXISTS', ARGV[6] .. id, ARGV[6] .. id .. ':content') > 0 then
    count = count + 1
    total = total + tonumber(members[i + 1])
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
if count >= tonumber(ARGV[3]) then return {'files', count, total} end
if total + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return {'bytes', count, total} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
redis.call('SET', KEYS[3], '', 'EX', ARGV[5])
return {'ok', count, total}
