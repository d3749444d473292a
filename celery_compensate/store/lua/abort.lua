--- ABORT: an operator stops a running saga.  Compensation is claimed and
--- the caller revokes its in-flight forward steps.  No step is settled
--- here: a worker may have received a step a moment ago without its
--- receipt being recorded yet (receipts are sent within a fraction of a
--- second, at the latest by the next heartbeat).  A held step stays
--- running until its revoke (terminate) is reported, it completes anyway
--- (then it is undone first), or its lease lapses; a step no worker holds
--- gets ``fe<i>`` = the reason and a lease of ARGV[5] seconds (a
--- heartbeat): received in that time it is held and running, else the
--- sweep gives it up with that reason.  So no undo starts while a step
--- that may have started can still land.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] reason; ARGV[5] seconds a step no
---   worker holds may still turn out received (the heartbeat interval)
---
--- Replies {status, old state, new state, {}, {}, undos due, steps to
--- revoke, steps whose nested saga the caller aborts}:
---   aborted      compensation claimed (also for this call sent again:
---                the steps still running are revoked again)
---   not-running  the saga is not RUNNING: nothing changed
---   past-pivot   the saga's pivot completed: it can only go forward,
---                nothing changed
---   missing      no such saga
---
--- Transitions: saga RUNNING -> COMPENSATING (``reason``, no ``failed``);
--- steps no worker holds: out of the outbox, lease ARGV[5] (the sweep
--- then sets R -> F); the current stage is opened, settled stages are
--- walked down (possibly -> COMPENSATED).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/clock"
--- @include "includes/rescore"
--- @include "includes/claim"
--- @include "includes/advance"
--- @include "includes/replay"
--- @include "includes/pivot"

local st = hget('state')
if not st then return {'missing'} end
local cur = num('cur')
-- the steps to revoke: those still running (a resent call gets them
-- again); and the running steps nested sagas hold, which the caller
-- aborts (the step settles when its child reports)
local function running()
  local ids, kids = {}, {}
  for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
    if hget('s' .. i) == 'R' then
      if hget('h' .. i) == '~' then kids[#kids + 1] = tonumber(i)
      else ids[#ids + 1] = tonumber(i) end
    end
  end
  return ids, kids
end
if st ~= 'RUNNING' then
  if hget('claim') == token then
    local r = replay('aborted', st, 'claim', 'RUNNING')
    r[7], r[8] = running()
    return r
  end
  return {'not-running', st, st}
end
if pivot_passed() then return {'past-pivot', st, st} end
local stopped, kids = running()
local t = clock()
for _, i in ipairs(stopped) do
  if not hget('h' .. i) then
    -- not known to be received: settled by the sweep after the grace,
    -- unless its receipt comes first
    redis.call('HSET', h, 'fe' .. i, ARGV[4], 'd' .. i,
               string.format('%.3f', t + tonumber(ARGV[5])))
    redis.call('HDEL', h, 'ob' .. i)
  end
end
claim(nil, ARGV[4])
local out = {}
open_stage(cur, out)
advance(out)
rescore()
return {'aborted', st, hget('state'), {}, {}, out, stopped, kids}
