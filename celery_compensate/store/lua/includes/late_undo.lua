--- @include "fields"
--- @include "num"
--- @include "undo_wait"
--- @include "describe"
--- @include "reopen"
--- @include "count_undo"

--- Undo step i again, or out of order (attempt ``attempt``, a fresh
--- budget): it completed after its undo was sent, or after its stage had
--- been settled without it (counted as ``count_undo`` says).
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
  count_undo(i)
  out[#out + 1] = describe(i, attempt)
  if hget('state') == 'COMPENSATED' then
    redis.call('HSET', h, 'state', 'COMPENSATING')
    reopen()
  end
end
