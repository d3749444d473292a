--- @include "fields"
--- @include "num"
--- @include "damaged"
--- @include "undo_wait"
--- @include "resume"

--- A COMPENSATION_FAILED saga is re-driven (an operator's retry, or its
--- parent's): every undo that spent its attempts gets a new budget and is
--- queued again (the next attempt number, so its task id is new), then
--- it goes on compensating as by ``resume``.  Returns a CORRUPT error
--- reply (nothing changed) when a step lacks its stage, spec or counters.
local function redrive(out)
  local n = num('n')
  for i = 0, n - 1 do
    local bad = damaged(i)
    if bad then return bad end
  end
  redis.call('HSET', h, 'state', 'COMPENSATING', 'rt', token)
  redis.call('HINCRBY', h, 'retries', 1)
  redis.call('HDEL', h, 'ended')
  for i = 0, n - 1 do
    if hget('x' .. i) == 'F' then
      local a = num('a' .. i)
      redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, a + 1, 'ab' .. i, a)
      undo_wait(i, 0)
    end
  end
  resume(out)
  return nil
end
