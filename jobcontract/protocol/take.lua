-- The scheduler's take: which waiting entries a consumer gets next, decided inside Redis so every
-- worker of a pool shares one account of what each tenant was given.
--
-- A plan is tiers in order (jobcontract.scheduling.TakePlan): a later tier is read only for what the
-- earlier ones could not fill. A tier is one queue: its own stream (the default tenant's lane) and
-- every tenant lane in its lane set. Within a tier, tenants take turns by start-time fair queueing:
-- the lane whose next entry has the smallest start tag goes next, its tag being the larger of the
-- tenant's finish tag and the queue's virtual time; taking an entry moves the tenant's finish tag on
-- by 1/share. A tenant that was idle starts at the queue's virtual time (no credit hoarded while
-- idle), a busy tenant never waits behind another's backlog for more than a turn, and a tenant with
-- share 2 gets two turns to one. A tier with min_age_ms > 0 gives only entries that waited at least
-- that long (a queue this worker would have to swap a model in for, say).
--
-- KEYS: the tenants' shares (hash tenant -> weight), then per tier: the queue's stream, its lane set,
--       its fair tags.
-- ARGV: group, consumer, room, lane infix (Keys.lane: a lane's stream is the queue's stream, the infix
--       and the tenant), default tenant name, then per tier: min_age_ms.
-- Answers {entries, streams}: entries as {stream, id, fields} in the order taken, and the streams of
-- every tier without an age bound, for the consumer to block on when nothing was taken (a blocking
-- read takes whatever comes, so a tier with an age bound is polled instead).
-- #include now.lua
local group, consumer, room, infix, default = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local shares = {}
local share_list = redis.call('HGETALL', KEYS[1])
for i = 1, #share_list, 2 do shares[share_list[i]] = tonumber(share_list[i + 1]) end
local now_ms = math.floor(now / 1000)

-- The first entry of a lane not yet delivered to anyone, is it at least `min_age_ms` old?
local function old_enough(stream, min_age_ms)
  if min_age_ms <= 0 then return true end
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then return false end
  local last = '0-0'
  for _, g in ipairs(groups) do
    local fields = {}
    for j = 1, #g, 2 do fields[g[j]] = g[j + 1] end
    if fields['name'] == group then last = fields['last-delivered-id'] end
  end
  local first = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
  if #first == 0 then return false end
  local ms = tonumber(string.match(first[1][1], '^(%d+)'))
  return now_ms - ms >= min_age_ms
end

local taken, streams = {}, {}
for t = 1, (#KEYS - 1) / 3 do
  local base, lane_set, tags_key = KEYS[2 + 3 * (t - 1)], KEYS[3 + 3 * (t - 1)], KEYS[4 + 3 * (t - 1)]
  local min_age_ms = tonumber(ARGV[5 + t])
  local lanes = {{tenant = default, stream = base}}
  for _, tenant in ipairs(redis.call('SMEMBERS', lane_set)) do
    lanes[#lanes + 1] = {tenant = tenant, stream = base .. infix .. tenant}
  end
  if min_age_ms <= 0 then
    for _, lane in ipairs(lanes) do streams[#streams + 1] = lane.stream end
  end
  if room > 0 then
    local tags = {}
    local tag_list = redis.call('HGETALL', tags_key)
    for i = 1, #tag_list, 2 do tags[tag_list[i]] = tonumber(tag_list[i + 1]) end
    local virtual = tags['~'] or 0
    local open, changed = {}, false
    for i, lane in ipairs(lanes) do open[i] = old_enough(lane.stream, min_age_ms) end
    while room > 0 do
      local best, best_start, best_tag = nil, nil, nil
      for i, lane in ipairs(lanes) do
        if open[i] then
          local tag = tags[lane.tenant] or 0
          local start = math.max(tag, virtual)
          -- ties (tenants caught up with the virtual time) go to the one served longest ago
          if best == nil or start < best_start or (start == best_start and tag < best_tag) then
            best, best_start, best_tag = i, start, tag
          end
        end
      end
      if best == nil then break end
      local lane = lanes[best]
      local read = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', lane.stream, '>'}
      local ok, reply = true, nil
      -- The queue's own stream without its group (Redis lost it) fails the script: recreating it is
      -- the broker's (ensure_group). A tenant lane's group is made again here.
      if lane.tenant == default then reply = redis.call(unpack(read)) else ok, reply = pcall(redis.call, unpack(read)) end
      if not ok then
        redis.pcall('XGROUP', 'CREATE', lane.stream, group, '0', 'MKSTREAM')
        open[best] = false
      elseif not reply or #reply[1][2] == 0 then
        open[best] = false
      else
        local entry = reply[1][2][1]
        taken[#taken + 1] = {lane.stream, entry[1], entry[2]}
        room = room - 1
        virtual = best_start
        tags[lane.tenant] = best_start + 1 / (shares[lane.tenant] or 1)
        changed = true
        if min_age_ms > 0 then open[best] = old_enough(lane.stream, min_age_ms) end
      end
    end
    if changed then
      local flat = {'~', tostring(virtual)}
      for tenant, tag in pairs(tags) do
        if tenant ~= '~' then flat[#flat + 1] = tenant; flat[#flat + 1] = tostring(tag) end
      end
      redis.call('HSET', tags_key, unpack(flat))
    end
  end
end
return {taken, streams}
