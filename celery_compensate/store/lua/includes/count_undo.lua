--- @include "fields"
--- @include "num"

--- Step i's undo is due again (a late undo, or one a nested saga's late
--- failure turned back): it counts in its stage (``y<k>``) while that
--- stage is the one being compensated, so the stage before waits for it;
--- otherwise it is a late undo (``l<i>``, ``late``).
local function count_undo(i)
  local k = hget('k' .. i)
  if tonumber(k) == num('cur') then
    redis.call('HDEL', h, 'l' .. i)
    redis.call('HINCRBY', h, 'y' .. k, 1)
  else
    redis.call('HSET', h, 'l' .. i, 1)
    redis.call('HINCRBY', h, 'late', 1)
  end
end
