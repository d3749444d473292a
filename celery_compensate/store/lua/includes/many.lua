--- HMGET, HSET and HDEL of many fields (unpack has a limit): 1000 at a
--- time, so field-value pairs of HSET stay whole.  Returns HMGET's values.
local function many(cmd, list)
  local out = {}
  for first = 1, #list, 1000 do
    local last = math.min(first + 999, #list)
    local r = redis.call(cmd, h, unpack(list, first, last))
    if cmd == 'HMGET' then
      for n = 1, last - first + 1 do out[first + n - 1] = r[n] end
    end
  end
  return out
end
