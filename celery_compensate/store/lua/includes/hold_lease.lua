--- @include "fields"
--- @include "clock"

--- A live worker holds step i's task or undo (``holder``, a token of its
--- copy): it must renew within ``o<i>`` (``field`` 'o') or ``ou<i>`` (the
--- undo, 'ou') seconds.
local function hold_lease(i, field, holder)
  local d = clock() + tonumber(hget(field .. i))
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d), 'h' .. i, holder)
end
