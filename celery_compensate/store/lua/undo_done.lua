--- UNDO_DONE: an undo attempt succeeded.  Record it and open the stage
--- before when this one is settled.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] step index
---
--- Replies {status, old state, new state, {}, {}, undos due}:
---   undone     recorded (also for this call sent again)
---   duplicate  another call recorded this undo already (or a nested
---              saga's report resent after its late failure: ``ot<i>``)
---   not-due    the undo is not due: nothing recorded
---   missing    no such saga
---   error CORRUPT  the record lacks the step's stage, spec or counters
---
--- Transitions: undo Q/R/W/F -> D; ``y<k>`` (or ``late``) - 1; a step that
--- took effect again meanwhile (``rd<i>``) gets a late undo; settled
--- stages are walked down, COMPENSATING -> COMPENSATED when all are; an
--- attempt counted lost on its last try that succeeds after all, with no
--- other undo failed, ends COMPENSATION_FAILED: -> COMPENSATING (resumed
--- as by RETRY).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/damaged"
--- @include "includes/rescore"
--- @include "includes/touch"
--- @include "includes/resume"

local st, cur0 = hget('state'), hget('cur')
if not st then return {'missing'} end
local i = ARGV[4]
local x = hget('x' .. i) or ''
if x == 'D' then
  if hget('tu' .. i) ~= token then return {'duplicate', st, st} end
  return replay('undone', st, 'fin', 'COMPENSATING')
end
if x == '' then return {'not-due', st, st} end
if string.find(hget('ot' .. i) or '', ' ' .. token .. ' ', 1, true) then
  -- a nested saga's report that recorded this undo done before its late
  -- failure turned it back, resent late (before or after an operator's
  -- retry sent the undo again): stale
  return {'duplicate', st, st}
end
local bad = damaged(i)
if bad then return bad end
redis.call('HSET', h, 'x' .. i, 'D', 'z' .. i, now, 'tu' .. i, token)
if hget('l' .. i) == '1' then
  redis.call('HINCRBY', h, 'late', -1)
else
  redis.call('HINCRBY', h, 'y' .. hget('k' .. i), -1)
end
local out = {}
if hget('rd' .. i) == '1' then
  -- the step took effect after this undo had been sent: undo it again
  redis.call('HDEL', h, 'rd' .. i)
  late_undo(i, num('a' .. i) + 1, out)
end
if st == 'COMPENSATION_FAILED' and x == 'F' then
  -- the attempt the sweep counted lost on its last try succeeded after
  -- all: if no other undo failed, nothing is left for an operator
  local failed = false
  for j = 0, num('n') - 1 do
    if hget('x' .. j) == 'F' then failed = true break end
  end
  if not failed then resume(out) end
end
advance(out)
touch(st, cur0, out)
return {'undone', st, hget('state'), {}, {}, out}
