--- RELEASE: a copy of step i's forward task left the worker that held it
--- without an outcome: Celery retries it (``self.retry``), it was replaced
--- (``self.replace``), ignored (``Ignore``), requeued (``Reject(requeue=
--- True)``, a lost pool child under ``task_reject_on_worker_lost``) or
--- returned to the broker by a warm shutdown.  It is queued again: the
--- queue lease, not its worker's, so a healthy saga is never compensated
--- while its step waits in the broker.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl (unused); ARGV[4] step index; ARGV[5] the
---   holder the copy was received as
---
--- Replies (a status alone):
---   released  the step is queued again (queued lease)
---   not-held  it is settled, or another copy holds it now: nothing changed
---
--- Transitions: forward R held -> R queued.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/wait_lease"
--- @include "includes/lower"

local i = ARGV[4]
local f = redis.call('HMGET', h, 's' .. i, 'h' .. i, 'c' .. i)
if f[1] ~= 'R' or f[2] ~= ARGV[5] then return 'not-held' end
wait_lease(i, f[3])
lower(hget('d' .. i))
return 'released'
