--- @include "fields"
--- @include "num"
--- @include "undo_wait"
--- @include "describe"
--- @include "reopen"

--- Undo step i again, or out of order (attempt ``attempt``, a fresh
--- budget): it completed after its undo was sent, or after its stage had
--- been settled without it.  While its stage is still the one being
--- compensated the undo counts in the stage (``y<k>``), so the stage
--- before waits for it; otherwise it is a late undo (``l<i>``, ``late``).
--- Nothing is sent while the saga waits for an operator (``rd<i>``: RETRY
--- sends it).
local function late_undo(i, attempt, out)
  if hget('state') == 'COMPENSATION_FAILED' then
    redis.call('HSET', h, 'rd' .. i, 1)
    return
  end
  -- a fresh budget: the attempts of an earlier undo of the step don't count
  redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, attempt, 'ab' .. i,
             attempt - 1)
  undo_wait(i, 0)
  local k = hget('k' .. i)
  if tonumber(k) == num('cur') then
    redis.call('HDEL', h, 'l' .. i)
    redis.call('HINCRBY', h, 'y' .. k, 1)
  else
    redis.call('HSET', h, 'l' .. i, 1)
    redis.call('HINCRBY', h, 'late', 1)
  end
  out[#out + 1] = describe(i, attempt)
  if hget('state') == 'COMPENSATED' then
    redis.call('HSET', h, 'state', 'COMPENSATING')
    reopen()
  end
end
