--- ABORT: an operator stops a running saga.  Compensation is claimed and
--- the caller revokes its in-flight forward steps: a step no worker holds
--- yet is given up at once; a held one stays running until its revoke
--- (terminate) is reported, it completes anyway (then it is undone
--- first), or its lease lapses, so its undo never runs while its effect
--- may still happen.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] reason
---
--- Replies {status, old state, new state, {}, {}, undos due, steps to
--- revoke}:
---   aborted      compensation claimed (also for this call sent again:
---                the steps still running are revoked again)
---   not-running  the saga is not RUNNING: nothing changed
---   missing      no such saga
---
--- Transitions: saga RUNNING -> COMPENSATING (``reason``, no ``failed``);
--- queued steps R -> F; the current stage is opened, settled stages are
--- walked down (possibly -> COMPENSATED).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/rescore"
--- @include "includes/claim"
--- @include "includes/advance"
--- @include "includes/replay"

local st = hget('state')
if not st then return {'missing'} end
local cur = num('cur')
-- the steps to revoke: those still running (a resent call gets them again)
local function running()
  local ids = {}
  for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
    if hget('s' .. i) == 'R' then ids[#ids + 1] = tonumber(i) end
  end
  return ids
end
if st ~= 'RUNNING' then
  if hget('claim') == token then
    local r = replay('aborted', st, 'claim', 'RUNNING')
    r[7] = running()
    return r
  end
  return {'not-running', st, st}
end
local stopped = running()
for _, i in ipairs(stopped) do
  if not hget('h' .. i) then
    -- no worker received it (RECEIVE marks a step held before the pool
    -- gets it): give it up now; a copy received later is refused
    redis.call('HSET', h, 's' .. i, 'F', 'fe' .. i, ARGV[4], 't' .. i, now,
               'tk' .. i, token)
    redis.call('HINCRBY', h, 'w' .. cur, -1)
  end
end
claim(nil, ARGV[4])
local out = {}
open_stage(cur, out)
advance(out)
rescore()
return {'aborted', st, hget('state'), {}, {}, out, stopped}
