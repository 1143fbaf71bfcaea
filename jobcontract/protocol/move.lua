-- Hands an entry back to its stream (a queue's or a tenant's lane of it) as a new entry. XACK answers 1
-- only for an entry still pending, so when several janitors race for the same entry exactly one moves
-- it. An entry handed back more than `max_redeliveries` times (a poison job that kills whoever runs
-- it) goes to dead letters under its queue's name, and its job is finished as failed so nobody waits on it.
-- #include entry.lua
-- #include fail_job.lua
local function move(stream, queue, group, id, max_redeliveries, dead, max_len, max_age_ms)
  local entries = redis.call('XRANGE', stream, id, id)
  local acked = redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
  if acked ~= 1 or #entries ~= 1 then return 0 end
  local message, redeliveries = read_entry(entries[1][2])
  if message == nil then return 0 end
  if redeliveries >= max_redeliveries then
    local reason = 'handed back ' .. redeliveries .. ' times after its worker died'
    add_dead_letter(dead, message, queue, reason, max_len, max_age_ms)
    fail_job(stream, message, 'worker_died', reason)
    return 0
  end
  add_entry(stream, message, redeliveries + 1)
  return 1
end
