-- The queue entry codec (jobcontract.protocol.entry on the Python side): field `m` holds the encoded
-- dramatiq message, `r` how many times the entry was handed back after its worker died. A dead
-- letter holds `m`, the queue name and the reason it was given up.
local function add_entry(stream, message, redeliveries)
  return redis.call('XADD', stream, '*', 'm', message, 'r', tostring(redeliveries))
end
local function read_entry(fields)
  local message, redeliveries = nil, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'r' then redeliveries = tonumber(fields[i + 1]) end
    if fields[i] == 'm' then message = fields[i + 1] end
  end
  return message, redeliveries
end
local function add_dead_letter(dead, message, queue, reason)
  return redis.call('XADD', dead, '*', 'm', message, 'queue', queue, 'reason', reason)
end
