--- @include "fields"
--- @include "inflight"

--- Keep the saga's entry in the deadline index at the earliest lease of
--- what it has in flight; take it out when nothing is (final states, and
--- COMPENSATION_FAILED, which waits for an operator).  ``earliest`` is nil
--- when nothing is in flight.  A nested saga that owes its parent a
--- report stays in the index until that report's deadline (``rpd``).
local function earliest()
  local v = redis.call('HMGET', h, 'state', 'cur', 'late', 'n', 'rpd')
  local best = tonumber(v[5] or '')
  if v[1] ~= 'RUNNING' and v[1] ~= 'COMPENSATING' then return best end
  -- read s/x/d/l of ``steps`` a batch at a time (unpack has a limit)
  local function scan(steps, late)
    for first = 1, #steps, 250 do
      local want = {}
      for n = first, math.min(first + 249, #steps) do
        local i = steps[n]
        want[#want + 1] = 's' .. i
        want[#want + 1] = 'x' .. i
        want[#want + 1] = 'd' .. i
        want[#want + 1] = 'l' .. i
      end
      local r = redis.call('HMGET', h, unpack(want))
      for m = 0, #want / 4 - 1 do
        local s, x = r[4 * m + 1], r[4 * m + 2] or ''
        local d = tonumber(r[4 * m + 3] or '')
        local counts
        if late then counts = r[4 * m + 4] == '1' and inflight(x)
        else counts = s == 'R' or inflight(x) end
        if counts and d and (best == nil or d < best) then best = d end
      end
    end
  end
  local cur = tonumber(v[2] or '0')
  if cur >= 0 then
    local steps = {}
    for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
      steps[#steps + 1] = i
    end
    scan(steps, false)
  end
  if tonumber(v[3] or '0') > 0 then
    local steps = {}
    for i = 0, tonumber(v[4] or '0') - 1 do steps[#steps + 1] = i end
    scan(steps, true)
  end
  return best
end

local function rescore()
  local best = earliest()
  if best then
    redis.call('ZADD', idx, string.format('%.3f', best), hget('id'))
  else
    redis.call('ZREM', idx, hget('id'))
  end
end
