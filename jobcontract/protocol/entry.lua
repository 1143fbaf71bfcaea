-- The queue entry codec (jobcontract.protocol.entry on the Python side): field `m` holds the encoded
-- dramatiq message, `r` how many times the entry was handed back after its worker died. A dead
-- letter holds `m`, the queue name and the reason it was given up; each one added trims the stream
-- to its cap (DeadLetterCap: at most `max_len` entries, none older than `max_age_ms` when set).
-- #include now.lua
local function add_entry(stream, message, redeliveries)
  return redis.call('XADD', stream, '*', 'm', message, 'r', tostring(redeliveries))
end
-- The consumer group every queue stream has: jobcontract.keys.CONSUMER_GROUP (a test checks they agree).
local GROUP = 'genq'
-- The prefix shards of a tenant's partitions: jobcontract.keys.PREFIX_SHARDS (a test checks they agree).
local SHARDS = 32
-- A queue's bell (jobcontract.keys.Keys.bell: beside its partition set) is rung once per partition
-- made, so that many idle consumers blocked on the queue wake and read the new partition too.
local BELL_CAP = 64
local function ring(partitions, member)
  local bell = string.sub(partitions, 1, #partitions - #':partitions') .. ':bell'
  if redis.call('EXISTS', bell) == 0 then redis.call('XGROUP', 'CREATE', bell, GROUP, '0', 'MKSTREAM') end
  redis.call('XADD', bell, 'MAXLEN', '~', BELL_CAP, '*', 'p', member)
end
local function make_partition(stream, partitions, member)
  if redis.call('EXISTS', stream) == 0 then redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM') end
  if redis.call('SADD', partitions, member) == 1 then ring(partitions, member) end
end
-- A partition of a queue (jobcontract.keys.Keys.partition: a tenant's, or a tenant's prefix shard) is
-- made with its group before its first entry and its member added to the queue's partition set, so
-- consumers find it and can read it at once. The first time a tenant's prefix shard is used, all its
-- shards are made at once: a consumer blocked on the queue's partitions then wakes for the tenant's
-- next prefix too, instead of a block later. `member` '' is the queue's own stream: nothing to register.
local function add_partition_entry(stream, partitions, member, message, redeliveries)
  if member ~= '' and redis.call('SISMEMBER', partitions, member) == 0 then
    local tenant, shard = string.match(member, '^([^#]+)#(%d+)$')
    if tenant then
      local prefix = string.sub(stream, 1, #stream - #member)
      for i = 0, SHARDS - 1 do make_partition(prefix .. tenant .. '#' .. i, partitions, tenant .. '#' .. i) end
    end
    make_partition(stream, partitions, member)
  end
  return add_entry(stream, message, redeliveries)
end
local function read_entry(fields)
  local message, redeliveries = nil, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'r' then redeliveries = tonumber(fields[i + 1]) end
    if fields[i] == 'm' then message = fields[i + 1] end
  end
  return message, redeliveries
end
local function add_dead_letter(dead, message, queue, reason, max_len, max_age_ms)
  local id = redis.call('XADD', dead, 'MAXLEN', '~', max_len, '*', 'm', message, 'queue', queue, 'reason', reason)
  if tonumber(max_age_ms) > 0 then
    -- MINID needs Redis 6.2: on an older one the count cap alone holds (pcall: never fail the move).
    redis.pcall('XTRIM', dead, 'MINID', '~', us(math.floor(now / 1000) - tonumber(max_age_ms)))
  end
  return id
end
