--- Read one field of the saga hash, as text.
local function hget(f) return redis.call('HGET', h, f) end
