--- @include "fields"
--- @include "clock"

--- A live worker holds step i's task or undo (``holder``, a token of its
--- copy): it must renew within ``o<i>`` (``field`` 'o') or ``ou<i>`` (the
--- undo, 'ou') seconds.
--- Returns the new deadline (text).
local function hold_lease(i, field, holder)
  local d = string.format('%.3f', clock() + tonumber(hget(field .. i)))
  redis.call('HSET', h, 'd' .. i, d, 'h' .. i, holder)
  return d
end
