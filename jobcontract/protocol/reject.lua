-- KEYS: stream (the queue's, or a tenant's lane of it), dead letters. ARGV: group, entry id, message, queue, reason, dead letters' max count
-- and max age (ms, 0: none). Files the entry under dead letters (trimmed to their cap), then acks
-- and deletes it: what the consumer's settle did in one MULTI, now with the trimming.
-- #include entry.lua
add_dead_letter(KEYS[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
