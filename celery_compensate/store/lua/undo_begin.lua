--- UNDO_BEGIN: a copy of an undo attempt is about to run its body: let one
--- copy in and start its (held) lease.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] step index; ARGV[5] attempt
---
--- Replies (a status alone):
---   run       this copy runs (also for this call sent again)
---   running   another copy of this attempt runs: this one does not
---   done      the undo is done already
---   not-due   the undo is not due
---   stale     not the current attempt
---   failed    the attempt was counted as failed
---   missing   no such saga
---
--- Transitions: undo Q/W -> R (held lease ``ou<i>``, ``b<i>`` started).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/hold_lease"
--- @include "includes/lower"

if redis.call('EXISTS', h) == 0 then return 'missing' end
local i = ARGV[4]
local x = hget('x' .. i) or ''
if x == 'D' then return 'done' end
if x == '' then return 'not-due' end
if tonumber(ARGV[5]) ~= num('a' .. i) then return 'stale' end
if x == 'F' then return 'failed' end
if x == 'R' then
  if hget('tb' .. i) == token then return 'run' end
  return 'running'
end
redis.call('HSET', h, 'x' .. i, 'R', 'b' .. i, now, 'tb' .. i, token)
lower(hold_lease(i, 'ou', token))
return 'run'
