--- @include "fields"

--- A finished saga has work again (a late undo): it stops expiring.
local function reopen()
  local id = hget('id')
  redis.call('PERSIST', h)
  redis.call('ZREM', ends, id)
  redis.call('ZADD', live, hget('created') or '0', id)
end
