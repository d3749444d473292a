--- @include "fields"

--- Whether the saga's pivot (``compensate_pivot``) completed: its point
--- of no return is passed.
local function pivot_passed()
  local pv = hget('pv')
  if not pv then return false end
  return hget('s' .. pv) == 'D'
end
