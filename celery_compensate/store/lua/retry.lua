--- RETRY: an operator re-drives a COMPENSATION_FAILED saga.  Every undo
--- that spent its attempts gets a new budget and is queued again (the next
--- attempt number, so its task id is new); finished undos are never
--- repeated.  What waited while the saga was COMPENSATION_FAILED is made
--- due now: the undos of steps that completed late (in the stage under
--- compensation, or out of order) and second undos (``rd<i>``).  Undos
--- still queued are sent again (only one copy of an attempt can begin).
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl
---
--- Replies {status, old state, new state, {}, {}, undos due}:
---   retried      sent again (also for this call sent again)
---   wrong-state  the saga is not COMPENSATION_FAILED: nothing changed
---   missing      no such saga
---   error CORRUPT  a step lacks its stage, spec or counters
---
--- Transitions: saga COMPENSATION_FAILED -> COMPENSATING (``retries`` + 1,
--- no ``ended``); undo F -> Q (a + 1, ``ab<i>`` = a); then as undo_done
--- (walk settled stages down, possibly -> COMPENSATED).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/damaged"
--- @include "includes/undo_wait"
--- @include "includes/rescore"
--- @include "includes/resume"

local st = hget('state')
if not st then return {'missing'} end
if hget('rt') == token then
  return replay('retried', st, 'rt', 'COMPENSATION_FAILED')
end
if st ~= 'COMPENSATION_FAILED' then return {'wrong-state', st, st} end
local n = num('n')
for i = 0, n - 1 do
  local bad = damaged(i)
  if bad then return bad end
end
redis.call('HSET', h, 'state', 'COMPENSATING', 'rt', token)
redis.call('HINCRBY', h, 'retries', 1)
redis.call('HDEL', h, 'ended')
for i = 0, n - 1 do
  if hget('x' .. i) == 'F' then
    local a = num('a' .. i)
    redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, a + 1, 'ab' .. i, a)
    undo_wait(i, 0)
  end
end
local out = {}
resume(out)
rescore()
return {'retried', st, hget('state'), {}, {}, out}
