--- RECEIVE: a worker's main process took step i's message (ARGV[5]
--- empty) or attempt ARGV[5] of its undo from the broker, before handing
--- it to the pool.  From now on the task is held: its lease is the short
--- one, renewed by that worker's heartbeat, so a worker killed at once is
--- noticed within the step's lease, not the queue timeout.  A copy the
--- record already settled, or an older publication of a step the sweep
--- published again, is refused here, before its body can run.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl (unused); ARGV[4] step index; ARGV[5] the
---   undo attempt, or '' for the forward task; ARGV[6] the message's
---   publish generation (forward steps); ARGV[7] the holder (a token of
---   this copy)
---
--- Replies (a status alone):
---   held            run it: the lease is the holder's now
---   done            refuse it: the step completed already
---   given-up        refuse it: the step was given up (lost, aborted,
---                   failed)
---   stale           refuse it: the sweep published the step again; this
---                   is an older copy
---   not-dispatched  refuse it: the step's stage was never dispatched
---   gone            an undo attempt that is not in flight: run it, the
---                   undo's own check (undo_begin) tells it why not
---   unknown-step    the saga has no such step: run it (a plain task)
---   missing         no such saga: run it (nothing to protect)
---
--- Transitions: forward R queued, in the outbox or aborted unheld -> R
--- held (``h<i>``; ``ob<i>``, ``fe<i>`` cleared); undo Q/W -> held.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/inflight"
--- @include "includes/hold_lease"
--- @include "includes/lower"

local i = ARGV[4]
local f = redis.call('HMGET', h, 'state', 's' .. i, 'pg' .. i, 'x' .. i,
                     'a' .. i, 'h' .. i)
if not f[1] then return 'missing' end
if ARGV[5] ~= '' then
  if not inflight(f[4] or '') or f[5] ~= ARGV[5] then return 'gone' end
  if f[4] ~= 'R' and f[6] ~= ARGV[7] then
    lower(hold_lease(i, 'ou', ARGV[7]))
  end
  return 'held'
end
local s = f[2]
if not s then return 'unknown-step' end
if s == 'D' then return 'done' end
if s == 'F' then return 'given-up' end
if s ~= 'R' then return 'not-dispatched' end
if tonumber(ARGV[6]) < tonumber(f[3] or '1') then return 'stale' end
if f[6] ~= ARGV[7] then
  local d = hold_lease(i, 'o', ARGV[7])
  -- received: out of the outbox, and no longer taken for never started
  -- by an abort (``fe``)
  redis.call('HDEL', h, 'ob' .. i, 'fe' .. i)
  lower(d)
end
return 'held'
