--- @include "fields"
--- @include "clock"

--- Step i's forward task or undo was just sent: until a worker holds it,
--- it may wait in the broker for ``qt`` seconds (plus ``extra``: its
--- countdown) before the recovery sweep takes it for lost.
local function wait_lease(i, extra)
  local d = clock() + tonumber(hget('qt')) + tonumber(extra or 0)
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d))
  redis.call('HDEL', h, 'h' .. i)
end
