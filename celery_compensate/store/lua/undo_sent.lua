--- UNDO_SENT: the process that made undo attempts due published their
--- messages: from now on each waits in the broker under the queue lease
--- (``qt`` plus its countdown) instead of the undo's own lease, which
--- covered a publisher dying in between.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl (unused); ARGV[4..] triples: step index,
---   attempt, countdown (seconds)
---
--- Replies (a status alone):
---   confirmed  at least one attempt was still queued and now has the
---              queue lease
---   gone       none was (begun, settled or superseded meanwhile)
---
--- Transitions: undo Q/W (publishing unconfirmed) -> Q/W (queued lease).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/wait_lease"
--- @include "includes/lower"

local n = 0
for m = 4, #ARGV - 2, 3 do
  local i = ARGV[m]
  local x = hget('x' .. i)
  if (x == 'Q' or x == 'W') and hget('a' .. i) == ARGV[m + 1]
      and not hget('h' .. i) then
    wait_lease(i, ARGV[m + 2])
    -- the queue lease can be shorter than the undo's own
    lower(hget('d' .. i))
    n = n + 1
  end
end
if n == 0 then return 'gone' end
return 'confirmed'
