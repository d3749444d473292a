--- @include "fields"
--- @include "num"
--- @include "due"
--- @include "finish"

--- Member i of stage k, the stage being compensated, gets its undo now if
--- it completed (or failed and opted in to compensate_on_failure) and its
--- undo is not due yet.  Idempotent, O(1).
local function open_member(i, k, out)
  if hget('state') == 'COMPENSATION_FAILED' then return end
  local u = hget('u' .. i)
  if u ~= '0' and (hget('x' .. i) or '') == '' then
    local s = hget('s' .. i)
    if s == 'D' or (s == 'F' and u == '2') then
      due(i, out)
      redis.call('HINCRBY', h, 'y' .. k, 1)
    end
  end
end

--- Stage k became the one being compensated: open every member (O(W),
--- once per stage; a member that settles later opens itself).
local function open_stage(k, out)
  for i in string.gmatch(hget('g' .. k) or '', '%d+') do
    open_member(i, k, out)
  end
end

--- Move the cursor down over settled stages, opening each next one; once
--- every stage is settled the saga is COMPENSATED and starts to expire.
--- Nothing moves while the saga is COMPENSATION_FAILED, nor in
--- FORWARD_FAILED (past its pivot: nothing is compensated).
local function advance(out)
  local st = hget('state')
  if st == 'COMPENSATION_FAILED' or st == 'FORWARD_FAILED' then return end
  local cur = num('cur')
  while cur >= 0 do
    if num('w' .. cur) > 0 or num('y' .. cur) > 0 then return end
    cur = cur - 1
    redis.call('HSET', h, 'cur', cur)
    if cur >= 0 then open_stage(cur, out) end
  end
  if num('late') > 0 then return end
  if hget('state') ~= 'COMPENSATED' then
    -- the id and what finish needs of a nested saga, in one read
    local v = redis.call('HMGET', h, 'id', 'up', 'kids', 'xp')
    finish('COMPENSATED', v[1], nil, {v[2], v[3], v[4]})
  end
end
