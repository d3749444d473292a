--- @include "owe"

--- An undo spent its attempts: the saga (``st`` before the call) waits
--- for an operator, COMPENSATION_FAILED, once; a nested saga then owes
--- its parent the report.
local function compensation_failed(st)
  if st == 'COMPENSATION_FAILED' then return end
  redis.call('HSET', h, 'state', 'COMPENSATION_FAILED', 'ended', now, 'cf',
             token)
  owe()
end
