-- FINISH for a job that no worker can finish: one whose stream entry goes to dead letters without a
-- run that ended (its workers kept dying). Called from the broker's scripts, which know only the
-- stream key, so the namespace is read from it and the key layout of `Keys` is spelled out here.
-- Timings are Unix seconds (cjson keeps 0.1 ms), which GenerationResult reads like ISO instants.
-- #include now.lua
local function fail_job(stream, message, error_type, reason)
  local ok, decoded = pcall(cjson.decode, message)
  local namespace = string.match(stream, '^(.-):q:')
  if not ok or type(decoded) ~= 'table' or type(decoded['message_id']) ~= 'string' or not namespace then
    return 0
  end
  local job_id = decoded['message_id']
  local job = namespace .. ':job:' .. job_id
  local state = redis.call('HGET', job, 'state')
  if not state or state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
  local f = redis.call('HMGET', job, 'model', 'worker', 'enqueued_us', 'started_us', 'backend', 'batch')
  local result = {job_id = job_id, model = f[1] or '', state = 'failed', finish_reason = 'error',
                  timings = {enqueued_at = tonumber(f[3] or now) / 1e6, finished_at = now / 1e6},
                  error = {type = error_type, message = reason, retryable = true}}
  if f[2] then result['worker'] = f[2] end
  if f[4] then result['timings']['started_at'] = tonumber(f[4]) / 1e6 end
  if f[5] then result['backend'] = f[5] end
  local ttl = redis.call('TTL', job)
  local encoded = cjson.encode(result)
  redis.call('HSET', job, 'state', 'failed', 'result', encoded, 'finished_us', us(now))
  redis.call('XADD', job .. ':events', '*', 'type', 'done', 'state', 'failed', 'result', encoded)
  if ttl > 0 then redis.call('EXPIRE', job .. ':events', ttl) end
  if f[6] then
    local done = namespace .. ':batch:' .. f[6] .. ':done'
    redis.call('XADD', done, '*', 'job', job_id, 'state', 'failed')
    if ttl > 0 then redis.call('EXPIRE', done, ttl) end
  end
  return 1
end
