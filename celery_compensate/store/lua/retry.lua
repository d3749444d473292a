--- RETRY: an operator re-drives a saga that waits for one.
---
--- FORWARD_FAILED (a step past the pivot spent its attempts): every
--- failed member of the current stage gets a new budget (``fb<i>``: the
--- attempts spent before) and is published again (generation + 1, its
--- own task id; ``rf<i>`` this call's token); the saga is RUNNING again
--- (``reason`` and ``failed`` dropped).
---
--- COMPENSATION_FAILED:  Every undo
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
---   retried      sent again (also for this call sent again); for a
---                FORWARD_FAILED saga with the results of the stage
---                before and {index, spec, generation, 0} of each step
---                to publish again
---   wrong-state  the saga waits for no operator: nothing changed
---   missing      no such saga
---   error CORRUPT  a step lacks its stage, spec or counters
---
--- Transitions: saga FORWARD_FAILED -> RUNNING (``retries`` + 1, no
--- ``ended``, ``reason``, ``failed``; ``rtf``), step F -> R (``fa`` + 1,
--- ``fb``, ``pg`` + 1, queued);
--- saga COMPENSATION_FAILED -> COMPENSATING (``retries`` + 1,
--- no ``ended``); undo F -> Q (a + 1, ``ab<i>`` = a); then as undo_done
--- (walk settled stages down, possibly -> COMPENSATED).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/damaged"
--- @include "includes/undo_wait"
--- @include "includes/rescore"
--- @include "includes/redrive"
--- @include "includes/results"
--- @include "includes/wait_lease"

local st = hget('state')
if not st then return {'missing'} end
--- The steps a forward retry (this call's, ``rtf``) published again, for
--- the call resent after its reply was lost (its caller published none).
local function republished(cur)
  local again = {}
  for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
    if hget('s' .. i) == 'R' and hget('rf' .. i) == token then
      again[#again + 1] = {tonumber(i), hget('p' .. i), num('pg' .. i), '0'}
    end
  end
  return again
end
if hget('rtf') == token then
  local cur = num('cur')
  return {'retried', 'FORWARD_FAILED', st, stage_results(cur),
          republished(cur)}
end
if hget('rt') == token then
  return replay('retried', st, 'rt', 'COMPENSATION_FAILED')
end
if st == 'FORWARD_FAILED' then
  local cur = num('cur')
  redis.call('HSET', h, 'state', 'RUNNING', 'rtf', token)
  redis.call('HINCRBY', h, 'retries', 1)
  redis.call('HDEL', h, 'ended', 'reason', 'failed')
  for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
    if hget('s' .. i) == 'F' then
      -- a fresh budget, a new generation (so a new task id: a revoke of
      -- the last copy does not stop this one)
      local gen = math.max(num('pg' .. i), 1) + 1
      local a = math.max(num('fa' .. i), 1) + 1
      redis.call('HSET', h, 's' .. i, 'R', 'fa' .. i, a, 'fb' .. i, a - 1,
                 'pg' .. i, gen, 'rf' .. i, token)
      redis.call('HINCRBY', h, 'w' .. cur, 1)
      wait_lease(i, 0)
    end
  end
  rescore()
  return {'retried', st, 'RUNNING', stage_results(cur), republished(cur)}
end
if st ~= 'COMPENSATION_FAILED' then return {'wrong-state', st, st} end
local out = {}
local bad = redrive(out)
if bad then return bad end
rescore()
return {'retried', st, hget('state'), {}, {}, out}
