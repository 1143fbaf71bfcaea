-- The jobs a batch queued, and its count of them, in one step.
-- KEYS: batch jobs hash, batch hash. ARGV: ttl_s, through_line, then job id, custom_id pairs.
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if #ARGV > 2 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local submitted = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[2], 'submitted', submitted, 'submitted_line', ARGV[2])
return submitted
