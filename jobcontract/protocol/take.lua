-- The scheduler's take: which waiting entries a consumer gets next, decided inside Redis so every
-- worker of a pool shares one account of what each tenant was given and one view of who is alive.
--
-- A plan is tiers in order (jobcontract.scheduling.TakePlan): a later tier is read only for the room
-- the earlier ones left. A tier is one queue's partitions: the queue's own stream (the default tenant's
-- partition), and each in its partition set, a member `tenant` or `tenant#shard` (Keys.partition) whose
-- stream is the queue's stream, the infix and the member. A tier selects its partitions:
--   all     every partition;
--   mine    the partitions without a shard, those whose shard this consumer owns, and those it
--           took from lately (warm: its server's prompt cache likely holds their prefix);
--   theirs  the partitions whose shard another live worker of the pool owns.
-- A prefix shard's owner is the pool's live worker with the highest SHA-1 of `shard|worker`
-- (rendezvous hashing): every worker computes the same owner from the same live set, a worker that
-- joins or dies moves only its own share of the shards, and a consumer not (yet) live owns all.
--
-- Within a tier, tenants take turns by start-time fair queueing: the partition whose next entry has the
-- smallest start tag goes next, its tag being the larger of its tenant's finish tag and the queue's
-- virtual time; taking an entry moves the tenant's finish tag on by 1/share. A tenant that was idle
-- starts at the queue's virtual time (no credit hoarded while idle), a busy tenant never waits
-- behind another's backlog for more than a turn, and a tenant with share 2 gets two turns to one.
-- Ties go to the tenant served longest ago; among one tenant's partitions, the one whose next job is
-- oldest goes first (first come first served within a tenant: no prefix shard starves another). A
-- tier with min_age_ms > 0 gives only entries that waited at least that long.
--
-- KEYS: the tenants' shares (hash tenant -> weight), then per tier: the queue's stream, its partition set,
--       its fair tags, its pool (the live workers, for shard owners).
-- ARGV: group, consumer, room, partition infix, default tenant name, then per tier: min_age_ms, select;
--       then the partitions this consumer took from lately (warm: read as its own).
-- Answers {entries, streams, wake_ms}: entries as {stream, id, fields} in the order taken; the
-- streams of every tier without an age bound, for the consumer to block on when nothing was taken
-- (a blocking read takes whatever comes, so an age-bounded tier is looked at again instead); and in
-- how many ms the first entry held back by an age bound comes of age (-1: none is waiting); and how
-- many partitions the age-bounded tiers select (a blocking read misses what is added to them, so
-- the consumer must not wait long in one).
-- #include now.lua
local group, consumer, room, infix, default = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local shares = {}
local share_list = redis.call('HGETALL', KEYS[1])
for i = 1, #share_list, 2 do shares[share_list[i]] = tonumber(share_list[i + 1]) end
local now_ms = math.floor(now / 1000)
local wake_ms = -1

-- The first entry of a partition not yet delivered to anyone: {ms, seq} of its id, or nil. Its
-- group's last-delivered id says where the undelivered entries start (settled ones are deleted).
local function head(stream)
  if redis.call('XLEN', stream) == 0 then return nil end  -- most partitions, cheaply
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then return nil end
  local last = nil
  for _, g in ipairs(groups) do
    local fields = {}
    for j = 1, #g, 2 do fields[g[j]] = g[j + 1] end
    if fields['name'] == group then last = fields['last-delivered-id'] end
  end
  if last == nil then return nil end
  local first = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
  if #first == 0 then return nil end
  local ms, seq = string.match(first[1][1], '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end

-- Whether a partition's next entry may be taken now: there is one, and it waited `min_age_ms`
-- (when it is too young, note when it comes of age).
local function ready(entry, min_age_ms)
  if entry == nil then return false end
  if min_age_ms <= 0 then return true end
  local age = now_ms - entry[1]
  if age >= min_age_ms then return true end
  local wait = min_age_ms - age
  if wake_ms < 0 or wait < wake_ms then wake_ms = wait end
  return false
end

local function older(x, y)
  return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2])
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

-- Partitions this consumer took from lately (its server's prompt cache likely holds their prefix):
-- its own as much as the shards it owns, so a worker that stole a prefix keeps to it.
local tiers = (#KEYS - 1) / 4
local warm = {}
for i = 6 + 2 * tiers, #ARGV do warm[ARGV[i]] = true end

local function selected(select, pool, member)
  if select == 'all' then return true end
  local shard = string.match(member, '#(.+)$')
  if shard == nil then return select == 'mine' end
  local mine = warm[member] or owner(pool, shard) == consumer
  if select == 'mine' then return mine end
  return not mine
end

local taken, streams, hidden = {}, {}, 0
for t = 1, tiers do
  local k = 2 + 4 * (t - 1)
  local base, lane_set, tags_key, pool = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local min_age_ms, select = tonumber(ARGV[4 + 2 * t]), ARGV[5 + 2 * t]
  local parts = {}
  if select ~= 'theirs' then parts[1] = {tenant = default, stream = base, own = true} end
  local members = redis.call('SMEMBERS', lane_set)
  table.sort(members)
  for _, member in ipairs(members) do
    if selected(select, pool, member) then
      local tenant = string.match(member, '^([^#]+)')
      parts[#parts + 1] = {tenant = tenant, stream = base .. infix .. member}
    end
  end
  if min_age_ms <= 0 then
    for _, part in ipairs(parts) do streams[#streams + 1] = part.stream end
  else
    hidden = hidden + #parts
  end
  if room > 0 and #parts > 0 then
    local tags = {}
    local tag_list = redis.call('HGETALL', tags_key)
    for i = 1, #tag_list, 2 do tags[tag_list[i]] = tonumber(tag_list[i + 1]) end
    local virtual = tags['~'] or 0
    local heads, open, changed = {}, {}, false
    for i, part in ipairs(parts) do
      heads[i] = head(part.stream)
      open[i] = ready(heads[i], min_age_ms)
    end
    while room > 0 do
      -- The tenant whose turn it is (smallest start tag; ties: the one served longest ago), and of
      -- its partitions the one whose next job is oldest: first come first served within a tenant,
      -- so no prefix shard of a tenant starves another.
      local best, best_start, best_tag = nil, nil, nil
      for i, part in ipairs(parts) do
        if open[i] then
          local tag = tags[part.tenant] or 0
          local start = math.max(tag, virtual)
          if best == nil or start < best_start or (start == best_start and tag < best_tag)
            or (start == best_start and tag == best_tag and older(heads[i], heads[best])) then
            best, best_start, best_tag = i, start, tag
          end
        end
      end
      if best == nil then break end
      local part = parts[best]
      local read = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', part.stream, '>'}
      local ok, reply = true, nil
      -- The queue's own stream without its group (Redis lost it) fails the script: recreating it is
      -- the broker's (ensure_group). A partition of the partition set has its group made again here.
      if part.own then reply = redis.call(unpack(read)) else ok, reply = pcall(redis.call, unpack(read)) end
      if not ok then
        redis.pcall('XGROUP', 'CREATE', part.stream, group, '0', 'MKSTREAM')
        open[best] = false
      elseif not reply or #reply[1][2] == 0 then
        open[best] = false
      else
        local entry = reply[1][2][1]
        taken[#taken + 1] = {part.stream, entry[1], entry[2]}
        room = room - 1
        virtual = best_start
        tags[part.tenant] = best_start + 1 / (shares[part.tenant] or 1)
        changed = true
        heads[best] = head(part.stream)
        open[best] = ready(heads[best], min_age_ms)
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
return {taken, streams, wake_ms, hidden}
