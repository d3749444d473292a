--- @include "fields"

--- The results of stage k - 1 (JSON), what a member of stage k is called
--- with.
local function stage_results(k)
  local prev = {}
  if k > 0 then
    for j in string.gmatch(hget('g' .. (k - 1)) or '', '%d+') do
      prev[#prev + 1] = hget('r' .. j) or 'null'
    end
  end
  return prev
end
