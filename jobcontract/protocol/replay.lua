-- KEYS: dead letters, job, job events, target stream (the job's lane of the queue), known queues,
-- the job's batch (the job again when it has none), the queue's partition set. ARGV: entry id, message,
-- model, lane, queue, timeout_us, ttl_s, has_batch, partition ('' for the queue's own stream).
-- #include now.lua
-- #include entry.lua
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return {'gone', ''} end
local state = redis.call('HGET', KEYS[2], 'state') or 'missing'
if state == 'succeeded' or state == 'cancelled' then return {'refused', state} end
-- A failed batch job already has its entry in the batch's stream of finished jobs and will add
-- another: the batch counts it once (finished = entries - replays; see producer/batch/finished.py).
if state == 'failed' and ARGV[8] == '1' and redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('HINCRBY', KEYS[6], 'replayed', 1)
end
redis.call('HDEL', KEYS[2], 'result', 'finished_us', 'started_us', 'worker', 'backend', 'cancel_requested')
redis.call('HSET', KEYS[2], 'state', 'queued', 'model', ARGV[3], 'lane', ARGV[4], 'queue', ARGV[5],
           'enqueued_us', us(now), 'deadline_us', us(now + tonumber(ARGV[6])), 'starts', '0')
redis.call('HINCRBY', KEYS[2], 'replays', 1)
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('DEL', KEYS[3])
add_partition_entry(KEYS[4], KEYS[7], ARGV[9], ARGV[2], 0)
redis.call('SADD', KEYS[5], ARGV[5])
redis.call('XDEL', KEYS[1], ARGV[1])
return {'replayed', state}
