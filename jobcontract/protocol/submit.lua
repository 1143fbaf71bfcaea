-- KEYS: the set of known queues (so a queue nobody serves yet is still seen by rescuers and
--       metrics), then per request: job, idempotency, and (the job's partition of the queue, pool,
--       circuit, the queue's partition set, the queue's own stream) per candidate.
-- ARGV: max_queued, ttl_s, owner (the gateway tenant the jobs belong to, or ''), the partition infix
--       (Keys.partition), the default tenant's name, then per request:
--       job_id, timeout_us, model, lane, batch_id, use_idempotency, fingerprint, partition (its
--       tenant and prefix shard, Keys.lane; '' for the queue's own stream), candidates n,
--       n messages, n queue names. The bound on queued jobs holds per tenant of a queue.
-- Answers {status, job_id, queue} per request ('queued' or 'existing'), or one refusal for the
-- whole list, written before anything is: {'full', index, queue} or {'conflict', index, job_id}.
-- With an owner, a new job is written with its `tenant`, and an earlier job that answers a request
-- and has none gets it (HSETNX: an owner is never changed), so no job is ever seen without its owner.
-- The layout is built by jobcontract.protocol.jobs.Submit; see jobcontract.admission for why.
-- #include now.lua
-- #include live.lua
-- #include entry.lua
local max_queued, ttl, tenant, infix, default = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local plans, planned, planned_key = {}, {}, {}
local k, a, index = 2, 6, 0
-- What one tenant has queued in a queue: its partitions summed (each prefix shard is one), counted
-- once a script; the bound on queued jobs holds per tenant, so one tenant's flood refuses only it.
local queued = {}
local function tenant_queued(base, set, member)
  local owner = member == '' and default or string.match(member, '^([^#]+)')
  local key = base .. '|' .. owner
  if queued[key] == nil then
    local total = owner == default and redis.call('XLEN', base) or 0
    for _, m in ipairs(redis.call('SMEMBERS', set)) do
      if m == owner or string.sub(m, 1, #owner + 1) == owner .. '#' then
        total = total + redis.call('XLEN', base .. infix .. m)
      end
    end
    queued[key] = total
  end
  return key
end
while a <= #ARGV do
  index = index + 1
  local job_key, idem_key = KEYS[k], KEYS[k + 1]
  local job_id, fingerprint, member, n = ARGV[a], ARGV[a + 6], ARGV[a + 7], tonumber(ARGV[a + 8])
  local use_idem = ARGV[a + 5] == '1'
  -- The job that already answers this request: its idempotency key's, or its id's own.
  local owner = use_idem and (planned_key[idem_key] or redis.call('GET', idem_key)) or nil
  if not owner and (planned[job_key] or redis.call('EXISTS', job_key) == 1) then owner = job_id end
  if owner then
    local owner_key = string.sub(job_key, 1, #job_key - #job_id) .. owner
    local known = planned[owner_key]
    local fields = known and {known.fingerprint, known.queue}
      or redis.call('HMGET', owner_key, 'fingerprint', 'queue')
    if fields[1] and fields[1] ~= fingerprint then return {{'conflict', tostring(index), owner}} end
    plans[index] = {status = 'existing', job_id = owner, queue = fields[2] or '', job_key = owner_key}
  else
    local chosen, fallback = nil, nil
    for i = 0, n - 1 do
      local live = live_workers(KEYS[k + 3 + 5 * i]) > 0
      if live and redis.call('EXISTS', KEYS[k + 4 + 5 * i]) == 0 then chosen = i break end
      if live and fallback == nil then fallback = i end
    end
    chosen = chosen or fallback or 0
    local c = k + 2 + 5 * chosen
    local stream, partitions, base, queue = KEYS[c], KEYS[c + 3], KEYS[c + 4], ARGV[a + 9 + n + chosen]
    local counted = tenant_queued(base, partitions, member)
    queued[counted] = queued[counted] + 1
    if queued[counted] > max_queued then
      return {{'full', tostring(index), queue}}
    end
    local plan = {status = 'queued', job_id = job_id, queue = queue, fingerprint = fingerprint,
                  job_key = job_key, idem_key = use_idem and idem_key, stream = stream, partitions = partitions,
                  message = ARGV[a + 9 + chosen], timeout_us = tonumber(ARGV[a + 1]), member = member,
                  model = ARGV[a + 2], lane = ARGV[a + 3], batch = ARGV[a + 4]}
    plans[index], planned[job_key] = plan, plan
    if use_idem then planned_key[idem_key] = job_id end
  end
  k, a = k + 2 + 5 * n, a + 9 + 2 * n
end
local replies = {}
for i, plan in ipairs(plans) do
  if plan.status == 'queued' then
    redis.call('HSET', plan.job_key, 'state', 'queued', 'model', plan.model, 'lane', plan.lane,
               'queue', plan.queue, 'enqueued_us', us(now), 'deadline_us', us(now + plan.timeout_us),
               'starts', '0', 'fingerprint', plan.fingerprint)
    if plan.batch ~= '' then redis.call('HSET', plan.job_key, 'batch', plan.batch) end
    if tenant ~= '' then redis.call('HSET', plan.job_key, 'tenant', tenant) end
    redis.call('EXPIRE', plan.job_key, ttl)
    add_partition_entry(plan.stream, plan.partitions, plan.member, plan.message, 0)
    redis.call('SADD', KEYS[1], plan.queue)
    if plan.idem_key then redis.call('SET', plan.idem_key, plan.job_id, 'EX', ttl) end
  elseif tenant ~= '' and redis.call('EXISTS', plan.job_key) == 1 then  -- one that expired stays gone
    redis.call('HSETNX', plan.job_key, 'tenant', tenant)
  end
  replies[i] = {plan.status, plan.job_id, plan.queue}
end
return replies
