--- @include "fields"
--- @include "num"
--- @include "late_undo"
--- @include "advance"
--- @include "replay"

--- A COMPENSATION_FAILED saga goes on compensating (an operator's RETRY,
--- or the late success of the attempt whose loss failed it): what waited
--- meanwhile is sent (the queued undos of the stage under compensation
--- and the late ones, the second undos marked ``rd``), the stage is
--- opened, and settled stages are walked down.
local function resume(out)
  redis.call('HSET', h, 'state', 'COMPENSATING')
  redis.call('HDEL', h, 'ended')
  queued(out)
  for i = 0, num('n') - 1 do
    local x = hget('x' .. i) or ''
    if hget('rd' .. i) == '1' and (x == '' or x == 'D') then
      redis.call('HDEL', h, 'rd' .. i)
      late_undo(i, num('a' .. i) + 1, out)
    end
  end
  local cur = num('cur')
  if cur >= 0 then open_stage(cur, out) end
  advance(out)
end
