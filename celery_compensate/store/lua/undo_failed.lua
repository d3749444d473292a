--- UNDO_FAILED: an undo attempt failed (or was lost before it started).
--- Schedule the next attempt or, when the budget is spent, make the saga
--- COMPENSATION_FAILED (its remaining undos wait for an operator).  Each
--- attempt is counted once, and a copy that never started (revoked,
--- expired, unknown, unpublished) does not count while another copy of
--- the attempt runs.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] step index; ARGV[5] the attempt that
---   failed; ARGV[6] error; ARGV[7] max attempts; ARGV[8] '1' if the
---   failing copy had started, else '0'; ARGV[9] seconds until the next
---   attempt; ARGV[10] '1': the undo is a nested saga's own compensation,
---   which may fail after it was recorded done (its late completer's undo)
---
--- Replies {status, old state, new state, {}, {}, {the next attempt}}:
---   retry     the next attempt is due (also for this call sent again)
---   failed    the budget is spent: saga -> COMPENSATION_FAILED
---   stale     not the current attempt: nothing counted
---   running   a copy that never started, while another copy runs
---   ignored   the undo is not in flight (or done, but for a nested
---             saga's failure after it: ARGV[10])
---   missing   no such saga
---
--- Transitions: undo Q/R/W -> W (``a<i>`` + 1, queued lease after the
--- countdown) or -> F with saga -> COMPENSATION_FAILED (leaves :due; a
--- nested saga then owes its parent a report: see includes/owe.lua).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/undo_wait"
--- @include "includes/describe"
--- @include "includes/rescore"
--- @include "includes/lower"
--- @include "includes/compensation_failed"
--- @include "includes/reopen"
--- @include "includes/count_undo"

local st = hget('state')
if not st then return {'missing'} end
local i = ARGV[4]
local x = hget('x' .. i) or ''
local a = num('a' .. i)
if hget('tu' .. i) == token and (x == 'W' or x == 'F') then
  if x == 'W' then return {'retry', st, st, {}, {}, {describe(i, a)}} end
  local old = st
  if hget('cf') == token then old = 'COMPENSATING' end
  return {'failed', old, st}
end
if x == 'D' and ARGV[10] == '1' and tonumber(ARGV[5]) == a then
  -- a nested saga reported undone, then its own late completer's undo
  -- spent its attempts: the step is not undone after all.  As a late
  -- undo that failed: F again, counted again (count_undo), the saga
  -- COMPENSATION_FAILED (reopened if it had ended), for an operator's
  -- retry to re-drive the child.  The report that had recorded it done
  -- may still be resent (a stalled reporter): its token is stale from now
  -- on (``ot<i>``).
  redis.call('HSET', h, 'ot' .. i,
             (hget('ot' .. i) or '') .. ' ' .. (hget('tu' .. i) or '') .. ' ')
  redis.call('HSET', h, 'x' .. i, 'F', 'e' .. i, ARGV[6], 'tu' .. i, token)
  count_undo(i)
  if st == 'COMPENSATED' then reopen() end
  compensation_failed(st)
  rescore()
  return {'failed', st, 'COMPENSATION_FAILED'}
end
if x == '' or x == 'D' or x == 'F' then return {'ignored', st, st} end
if tonumber(ARGV[5]) ~= a then return {'stale', st, st} end
if x == 'R' and ARGV[8] == '0' then return {'running', st, st} end
redis.call('HSET', h, 'e' .. i, ARGV[6], 'tu' .. i, token)
if a - num('ab' .. i) >= tonumber(ARGV[7]) then
  redis.call('HSET', h, 'x' .. i, 'F')
  compensation_failed(st)
  rescore()
  return {'failed', st, 'COMPENSATION_FAILED'}
end
redis.call('HSET', h, 'x' .. i, 'W', 'a' .. i, a + 1)
undo_wait(i, ARGV[9])
lower(hget('d' .. i))
return {'retry', st, st, {}, {}, {describe(i, a + 1)}}
