--- @include "wait_lease"
--- @include "describe"

--- Make step i's undo due (first attempt) and add it to ``out``.
local function due(i, out)
  redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, 1)
  wait_lease(i, 0)
  out[#out + 1] = describe(i, 1)
end
