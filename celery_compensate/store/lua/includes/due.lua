--- @include "undo_wait"
--- @include "describe"

--- Make step i's undo due (first attempt) and add it to ``out``.
local function due(i, out)
  redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, 1)
  undo_wait(i, 0)
  out[#out + 1] = describe(i, 1)
end
