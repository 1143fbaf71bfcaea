-- KEYS: stream (the queue's, or a tenant's lane of it), the consumer's liveness key, dead letters.
-- ARGV: group, max redeliveries, consumer, dead letters' max count and max age (ms, 0: none), queue name.
-- Answers -1 while the consumer is vouched for, else how many entries it moved.
-- #include move.lua
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 500, ARGV[3])
local moved = 0
for _, entry in ipairs(pending) do
  moved = moved + move(KEYS[1], ARGV[6], ARGV[1], entry[1], tonumber(ARGV[2]), KEYS[3], ARGV[4], ARGV[5])
end
if #pending < 500 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[3]) end
return moved
