--- @include "fields"
--- @include "wait_lease"
--- @include "describe"

--- A finished saga has work again (a late undo): it stops expiring.
local function reopen()
  local id = hget('id')
  redis.call('PERSIST', h)
  redis.call('ZREM', ends, id)
  redis.call('ZADD', live, hget('created') or '0', id)
end

--- Undo step i out of order (attempt ``attempt``): it completed after its
--- stage had been settled without it.  Nothing is sent while the saga
--- waits for an operator (``rd<i>``: RETRY sends it).
local function late_undo(i, attempt, out)
  if hget('state') == 'COMPENSATION_FAILED' then
    redis.call('HSET', h, 'rd' .. i, 1)
    return
  end
  -- a fresh budget: the attempts of an earlier undo of the step don't count
  redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, attempt, 'ab' .. i,
             attempt - 1, 'l' .. i, 1)
  wait_lease(i, 0)
  redis.call('HINCRBY', h, 'late', 1)
  out[#out + 1] = describe(i, attempt)
  if hget('state') == 'COMPENSATED' then
    redis.call('HSET', h, 'state', 'COMPENSATING')
    reopen()
  end
end
