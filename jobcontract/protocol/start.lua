-- KEYS: job. ARGV: worker, backend, queue.
-- #include now.lua
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing'} end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return {state} end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return {'cancel'} end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_us', us(now), 'worker', ARGV[1],
           'backend', ARGV[2], 'queue', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'starts', 1)
return {'run', redis.call('HGET', KEYS[1], 'enqueued_us'), redis.call('HGET', KEYS[1], 'deadline_us'),
        us(now)}
