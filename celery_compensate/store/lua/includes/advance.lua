--- @include "fields"
--- @include "num"
--- @include "due"
--- @include "finish"

--- Stage k is being compensated: every member that completed (or failed
--- and opted in to compensate_on_failure) and has an undo not yet due
--- gets it now.  Idempotent.
local function open_stage(k, out)
  if hget('state') == 'COMPENSATION_FAILED' then return end
  for i in string.gmatch(hget('g' .. k) or '', '%d+') do
    local u = hget('u' .. i)
    if u ~= '0' and (hget('x' .. i) or '') == '' then
      local s = hget('s' .. i)
      if s == 'D' or (s == 'F' and u == '2') then
        due(i, out)
        redis.call('HINCRBY', h, 'y' .. k, 1)
      end
    end
  end
end

--- Move the cursor down over settled stages, opening each next one; once
--- every stage is settled the saga is COMPENSATED and starts to expire.
--- Nothing moves while the saga is COMPENSATION_FAILED.
local function advance(out)
  if hget('state') == 'COMPENSATION_FAILED' then return end
  local cur = num('cur')
  while cur >= 0 do
    if num('w' .. cur) > 0 or num('y' .. cur) > 0 then return end
    cur = cur - 1
    redis.call('HSET', h, 'cur', cur)
    if cur >= 0 then open_stage(cur, out) end
  end
  if num('late') > 0 then return end
  if hget('state') ~= 'COMPENSATED' then finish('COMPENSATED', hget('id')) end
end
