-- A message a worker puts back on a queue itself (a retry, a reroute, a delayed job now due): added to
-- its lane of the queue (its tenant and prefix shard), and the queue named in the known set (a rerouted job's queue may
-- be new to rescuers and metrics).
-- KEYS: known queues, the lane's stream, the queue's partition set. ARGV: queue, message, partition ('' for
-- the queue's own stream).
-- #include entry.lua
redis.call('SADD', KEYS[1], ARGV[1])
return add_partition_entry(KEYS[2], KEYS[3], ARGV[3], ARGV[2], 0)
