--- Read one field of the saga hash as a number (0 when unset).
local function num(f) return tonumber(redis.call('HGET', h, f) or '0') end
