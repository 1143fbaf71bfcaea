-- Only forward, never out of a terminal status; once cancelling, only to cancelled.
-- KEYS: batch hash. ARGV: new status, now (s).
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return '' end
if current == 'completed' or current == 'failed' or current == 'cancelled' or current == 'expired' then
  return current
end
if current == 'cancelling' and ARGV[1] ~= 'cancelled' then return current end
redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
return ARGV[1]
