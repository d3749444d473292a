--- @include "fields"
--- @include "num"

--- Describe an undo attempt of step i for the caller to publish: with the
--- results of the stage before, which the step was called with.
--- Returns {index, spec JSON, result JSON, {results of the stage before},
--- attempt, seconds to wait before sending it (as a string)}.
local function describe(i, attempt, countdown)
  local prev, k = {}, num('k' .. i)
  if k > 0 then
    for j in string.gmatch(hget('g' .. (k - 1)), '%d+') do
      prev[#prev + 1] = hget('r' .. j) or 'null'
    end
  end
  return {tonumber(i), hget('p' .. i), hget('r' .. i) or 'null', prev,
          attempt, tostring(countdown or 0)}
end
