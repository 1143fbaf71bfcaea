-- Redis's clock in integer microseconds (exact in a Lua double); `us` prints one without an exponent.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function us(n) return string.format('%.0f', n) end
