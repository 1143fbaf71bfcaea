-- The janitor's look for dead consumers, in one call: every consumer of a queue stream's group
-- (each declared queue's own stream and each in its partition set) that nobody vouches for (its
-- liveness key is gone), the asker excepted. Handing their entries back is reclaim.lua's, one call
-- per consumer found; an idle fleet finds none, so its janitors cost one call a pass, not one per
-- queue and partition. A dead consumer's place in a queue's bell group (whose entries only wake
-- readers, nothing to hand back) is dropped here.
-- KEYS: the set of declared queues.
-- ARGV: group, the asker, a queue stream's key prefix (Keys.stream('')), the partition set's suffix,
--       the partition infix, a liveness key's prefix (Keys.alive('')), the bell's suffix.
-- Answers {queue, partition ('' for the queue's own stream), consumer} for each one found.
local group, asker, stream_prefix, set_suffix, infix, alive_prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local bell_suffix = ARGV[7]
local found = {}
local function dead(name)
  return name ~= asker and redis.call('EXISTS', alive_prefix .. name) == 0
end
local function named(consumer)
  for j = 1, #consumer, 2 do if consumer[j] == 'name' then return consumer[j + 1] end end
  return nil
end
for _, queue in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local stream = stream_prefix .. queue
  local members = redis.call('SMEMBERS', stream .. set_suffix)
  table.insert(members, 1, '')
  for _, member in ipairs(members) do
    local key = stream
    if member ~= '' then key = stream .. infix .. member end
    local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', key, group)
    if ok then  -- else the stream or its group is gone: nobody to hand back from
      for _, consumer in ipairs(consumers) do
        local name = named(consumer)
        if name ~= nil and dead(name) then found[#found + 1] = {queue, member, name} end
      end
    end
  end
  local bell = stream .. bell_suffix
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', bell, group)
  if ok then
    for _, consumer in ipairs(consumers) do
      local name = named(consumer)
      if name ~= nil and dead(name) then redis.call('XGROUP', 'DELCONSUMER', bell, group, name) end
    end
  end
end
return found
