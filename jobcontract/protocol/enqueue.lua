-- A message a worker puts back on a queue itself (a retry, a reroute, a delayed job now due): added to
-- its tenant's lane of the queue, and the queue named in the known set (a rerouted job's queue may
-- be new to rescuers and metrics).
-- KEYS: known queues, the lane's stream, the queue's lane set. ARGV: queue, message, tenant ('' for
-- the default tenant, whose lane is the queue's own stream).
-- #include entry.lua
redis.call('SADD', KEYS[1], ARGV[1])
return add_lane_entry(KEYS[2], KEYS[3], ARGV[3], ARGV[2], 0)
