--- Leases are measured on the Redis clock, so workers' clocks may differ.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
