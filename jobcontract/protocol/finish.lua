-- KEYS: job, events, batch-done stream (the job key again when there is no batch).
-- ARGV: state, result json, ttl_s, job_id, has_batch.
-- #include now.lua
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'result', ARGV[2], 'finished_us', us(now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
-- The result rides in the done event too: a waiter reads it there, with no HGET after.
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'state', ARGV[1], 'result', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[3], '*', 'job', ARGV[4], 'state', ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return 1
