--- STEP_FAILED: a forward step failed for good (its exception after
--- Celery's retries, a time limit, a lost pool child, Reject, a revoke, an
--- unknown task, a publish error).  The first failure of a running saga
--- claims its compensation, exactly once however many notifications come.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] step index; ARGV[5] reason; ARGV[6]
---   '' or, when the body returned but its result cannot be stored, the
---   placeholder result (JSON): the step took effect, so its undo runs
---   (``u<i>`` 1 -> 2) and gets the placeholder; ARGV[7] the publish
---   generation of the copy that failed ('' unknown: a report from a
---   worker's main process about a copy whose task id carries none);
---   ARGV[8] forward attempts per step past the pivot; ARGV[9], ARGV[10]
---   their backoff and its cap (seconds); ARGV[11] '1': the step was
---   stopped on purpose (revoked): past the pivot it is not retried
---
--- Replies {status, old state, new state, {}, {}, undos due}:
---   claimed         the saga was RUNNING: now COMPENSATING
---   joined          recorded while the saga already compensates
---   replayed        this call was resent after its reply was lost
---   duplicate       another call recorded this failure already
---   completed-step  the step is recorded done: the failure is ignored
---   forward-retry   past the pivot: the step is published again after
---                   the backoff ({index, spec, generation, countdown})
---   forward-failed  past the pivot, its attempts spent: saga RUNNING ->
---                   FORWARD_FAILED
---                   (a call resent after its reply was lost, ``tr<i>``
---                   its token, answers the same again)
---   stale-copy      past the pivot, the failure of a copy older than the
---                   one published last: ignored (a copy published again
---                   past the pivot has the generation in its task id, so
---                   a report without one is about an older copy once
---                   ``fa`` > 1)
---   not-dispatched  its stage was never dispatched (a stale or forged
---                   message): nothing changed
---   unknown-step    the saga has no such step
---   missing         no such saga
---   error CORRUPT   the record lacks the step's stage, spec or counters
---
--- Transitions: past a completed pivot, step R stays R, published again
--- (``fa``, ``pg`` + 1), or R -> F with saga RUNNING -> FORWARD_FAILED;
--- otherwise step R -> F (with a placeholder result: undone like a
--- completed step); saga RUNNING -> COMPENSATING (claimed, with
--- ``reason`` and ``failed``); the stage under compensation is opened
--- (undos of its completed members and compensate_on_failure ones due);
--- settled stages are walked down, possibly COMPENSATING -> COMPENSATED.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/damaged"
--- @include "includes/rescore"
--- @include "includes/touch"
--- @include "includes/claim"
--- @include "includes/advance"
--- @include "includes/replay"
--- @include "includes/results"
--- @include "includes/forward"

local st, cur0 = hget('state'), hget('cur')
if not st then return {'missing'} end
local i = ARGV[4]
local s = hget('s' .. i)
if not s then return {'unknown-step', st, st} end
if s == 'D' then return {'completed-step', st, st} end
-- a message of a stage never dispatched cannot have failed for the saga:
-- claiming would compensate a healthy saga (step_done refuses it too)
if s == 'P' then return {'not-dispatched', st, st} end
if s == 'F' then
  if hget('tk' .. i) ~= token then return {'duplicate', st, st} end
  if hget('ff') == token then
    -- resent after its reply was lost: the transition is told again
    return {'forward-failed', 'RUNNING', st}
  end
  return replay('replayed', st, 'claim', 'RUNNING')
end
local bad = damaged(i)
if bad then return bad end
local k = hget('k' .. i)
if st == 'RUNNING' and past_pivot(i) then
  local g = ARGV[7] or ''
  if hget('tr' .. i) == token then
    -- resent after its reply was lost: its caller published nothing, so
    -- the copy it made due is handed out again (the same generation)
    return {'forward-retry', st, st, stage_results(tonumber(k)),
            {{tonumber(i), hget('p' .. i), num('pg' .. i),
              hget('trd' .. i) or '0'}}}
  end
  if (g ~= '' and tonumber(g) < math.max(num('pg' .. i), 1))
      or (g == '' and num('fa' .. i) > 1) then
    -- a copy published before the last one: its failure was counted
    return {'stale-copy', st, st}
  end
  -- a result that cannot be stored fails every attempt alike, and a
  -- revoked step was stopped on purpose: no more attempts
  local max = tonumber(ARGV[8])
  if (ARGV[6] or '') ~= '' or ARGV[11] == '1' then
    max = num('fa' .. i) - num('fb' .. i)
  end
  local again = forward_retry(i, ARGV[5], max, tonumber(ARGV[9]),
                              tonumber(ARGV[10]))
  rescore()
  if not again then return {'forward-failed', st, 'FORWARD_FAILED'} end
  return {'forward-retry', st, st, stage_results(tonumber(k)), {again}}
end
if (ARGV[6] or '') ~= '' then
  redis.call('HSET', h, 'r' .. i, ARGV[6])
  if hget('u' .. i) == '1' then redis.call('HSET', h, 'u' .. i, 2) end
end
redis.call('HSET', h, 's' .. i, 'F', 'fe' .. i, ARGV[5], 't' .. i, now,
           'tk' .. i, token)
if s == 'R' then redis.call('HINCRBY', h, 'w' .. k, -1) end
local status = 'joined'
if st == 'RUNNING' then
  claim(i, ARGV[5])
  status = 'claimed'
end
local out = {}
if tonumber(k) == num('cur') then
  -- claimed: the whole stage is opened (once); joined: only this member
  if status == 'claimed' then open_stage(k, out) else open_member(i, k, out) end
end
advance(out)
touch(st, cur0, out)
return {status, st, hget('state'), {}, {}, out}
