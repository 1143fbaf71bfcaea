-- KEYS: the placement records hash, its until set. Answers the records (JSON) of the workers vouched
-- for now on the Redis clock; a record past its instant is not answered (publish drops it for good).
-- #include now.lua
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. us(now), '+inf')
if #live == 0 then return {} end
local records = redis.call('HMGET', KEYS[1], unpack(live))
local answer = {}
for i, record in ipairs(records) do
  if record then answer[#answer + 1] = record end
end
return answer
