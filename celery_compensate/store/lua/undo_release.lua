--- UNDO_RELEASE: the running copy of an undo attempt stopped without an
--- outcome because Celery retries it (``self.retry()``/``autoretry_for``
--- in the undo task): the retry comes as another copy of the same attempt
--- and must be let in.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] step index; ARGV[5] the token of the
---   UNDO_BEGIN call that let this copy run
---
--- Replies (a status alone):
---   released  the attempt is queued again (queued lease)
---   not-held  no copy let in by that token runs: nothing changed
---
--- Transitions: undo R -> Q.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/wait_lease"
--- @include "includes/lower"

local i = ARGV[4]
if hget('x' .. i) == 'R' and hget('tb' .. i) == ARGV[5] then
  redis.call('HSET', h, 'x' .. i, 'Q')
  wait_lease(i, 0)
  lower(hget('d' .. i))
  return 'released'
end
return 'not-held'
