-- The scheduler's take: which waiting entries a consumer gets next, decided inside Redis so every
-- worker of a pool shares one account of what each tenant was given and one view of who is alive.
--
-- A plan is tiers in order (jobcontract.scheduling.TakePlan): a later tier is read only for the room
-- the earlier ones left. A tier is one queue's lanes: the queue's own stream (the default tenant's
-- lane), and each lane in its partition set, a member `tenant` or `tenant#shard` (Keys.lane) whose
-- stream is the queue's stream, the infix and the member. A tier selects its lanes:
--   all     every lane;
--   mine    the lanes without a shard, and those whose shard this consumer owns;
--   theirs  the lanes whose shard another live worker of the pool owns.
-- A prefix shard's owner is the pool's live worker with the highest SHA-1 of `shard|worker`
-- (rendezvous hashing): every worker computes the same owner from the same live set, a worker that
-- joins or dies moves only its own share of the shards, and a consumer not (yet) live owns all.
--
-- Within a tier, tenants take turns by start-time fair queueing: the lane whose next entry has the
-- smallest start tag goes next, its tag being the larger of its tenant's finish tag and the queue's
-- virtual time; taking an entry moves the tenant's finish tag on by 1/share. A tenant that was idle
-- starts at the queue's virtual time (no credit hoarded while idle), a busy tenant never waits
-- behind another's backlog for more than a turn, and a tenant with share 2 gets two turns to one.
-- Ties go to the tenant served longest ago, then to the lane listed first, so a consumer keeps to
-- one lane (one prefix) of a tenant while it lasts. A tier with min_age_ms > 0 gives only entries
-- that waited at least that long.
--
-- KEYS: the tenants' shares (hash tenant -> weight), then per tier: the queue's stream, its partition set,
--       its fair tags, its pool (the live workers, for shard owners).
-- ARGV: group, consumer, room, lane infix, default tenant name, then per tier: min_age_ms, select.
-- Answers {entries, streams, wake_ms}: entries as {stream, id, fields} in the order taken; the
-- streams of every tier without an age bound, for the consumer to block on when nothing was taken
-- (a blocking read takes whatever comes, so an age-bounded tier is looked at again instead); and in
-- how many ms the first entry held back by an age bound comes of age (-1: none is waiting).
-- #include now.lua
local group, consumer, room, infix, default = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local shares = {}
local share_list = redis.call('HGETALL', KEYS[1])
for i = 1, #share_list, 2 do shares[share_list[i]] = tonumber(share_list[i + 1]) end
local now_ms = math.floor(now / 1000)
local wake_ms = -1

-- The first entry of a lane not yet delivered to anyone: is it at least `min_age_ms` old? When it
-- is too young, note when it comes of age.
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
  local age = now_ms - tonumber(string.match(first[1][1], '^(%d+)'))
  if age >= min_age_ms then return true end
  local wait = min_age_ms - age
  if wake_ms < 0 or wait < wake_ms then wake_ms = wait end
  return false
end

-- Which shards this consumer owns, given the pool's live workers (computed once per pool).
local owners_of = {}
local function owner(pool, shard)
  local known = owners_of[pool]
  if known == nil then
    known = {live = redis.call('ZRANGEBYSCORE', pool, now, '+inf'), shard = {}}
    known.mine = false
    for _, w in ipairs(known.live) do if w == consumer then known.mine = true end end
    owners_of[pool] = known
  end
  if not known.mine then return consumer end
  local cached = known.shard[shard]
  if cached then return cached end
  local best, best_hash = consumer, ''
  for _, w in ipairs(known.live) do
    local h = redis.sha1hex(shard .. '|' .. w)
    if h > best_hash then best, best_hash = w, h end
  end
  known.shard[shard] = best
  return best
end

local function selected(select, pool, member)
  if select == 'all' then return true end
  local shard = string.match(member, '#(.+)$')
  if shard == nil then return select == 'mine' end
  local mine = owner(pool, shard) == consumer
  if select == 'mine' then return mine end
  return not mine
end

local taken, streams = {}, {}
for t = 1, (#KEYS - 1) / 4 do
  local k = 2 + 4 * (t - 1)
  local base, lane_set, tags_key, pool = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local min_age_ms, select = tonumber(ARGV[4 + 2 * t]), ARGV[5 + 2 * t]
  local lanes = {}
  if select ~= 'theirs' then lanes[1] = {tenant = default, stream = base, own = true} end
  local members = redis.call('SMEMBERS', lane_set)
  table.sort(members)
  for _, member in ipairs(members) do
    if selected(select, pool, member) then
      local tenant = string.match(member, '^([^#]+)')
      lanes[#lanes + 1] = {tenant = tenant, stream = base .. infix .. member}
    end
  end
  if min_age_ms <= 0 then
    for _, lane in ipairs(lanes) do streams[#streams + 1] = lane.stream end
  end
  if room > 0 and #lanes > 0 then
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
      -- the broker's (ensure_group). A lane of the partition set has its group made again here.
      if lane.own then reply = redis.call(unpack(read)) else ok, reply = pcall(redis.call, unpack(read)) end
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
return {taken, streams, wake_ms}
