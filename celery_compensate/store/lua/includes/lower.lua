--- @include "fields"

--- A member event (a lease set on one step) only lowers the saga's entry
--- to ``d`` when that is earlier: O(1) whatever the stage's width.  The
--- score is then a lower bound of what is in flight, never later; when it
--- lapses early the sweep's RECOVER finds nothing lapsed and rescores
--- exactly (O(W), once per lease).
local function lower(d)
  local st = hget('state')
  if d and (st == 'RUNNING' or st == 'COMPENSATING') then
    redis.call('ZADD', idx, 'LT', d, hget('id'))
  end
end
