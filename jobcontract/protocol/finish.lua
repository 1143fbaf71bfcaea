-- KEYS: job, events, batch-done stream (the job key again when there is no batch).
-- ARGV: state, result json, ttl_s, job_id, has_batch.
-- #include now.lua
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
-- The result is stored once, in the done event: a waiter reads it there with no HGET after, and
-- the record names the event (result_at) for readers of the record (jobcontract.waiting.StoredResult).
-- A stream's first entry sits in a listpack node allocated whole (stream-node-max-bytes, 4 KB), so
-- the event holds the result at no extra cost, where a copy in the record cost its full size.
local id = redis.call('XADD', KEYS[2], '*', 'type', 'done', 'state', ARGV[1], 'result', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'result_at', id, 'finished_us', us(now))
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[3], '*', 'job', ARGV[4], 'state', ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return 1
