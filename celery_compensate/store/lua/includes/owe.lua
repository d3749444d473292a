--- @include "fields"
--- @include "clock"

--- A nested saga settled (completed, compensated, or COMPENSATION_FAILED):
--- it owes its parent a report.  The caller reports it at once; if that
--- caller dies first, the sweep does after ``rg`` seconds (the child's
--- step lease), as for a lost step.  Nothing for an outermost saga, nor
--- for a nested one whose outermost saga ended (``xp``).
--- ``up``: the ``up`` field when the caller read it already.
local function owe(up)
  if up == nil then up = hget('up') end
  -- ``xp``: its outermost saga ended; nobody waits for a report
  if not up or hget('xp') then return false end
  local d = string.format('%.3f', clock() + tonumber(hget('rg') or '60'))
  redis.call('HSET', h, 'rp', token, 'rpd', d)
  redis.call('ZADD', idx, d, hget('id'))
  return true
end
