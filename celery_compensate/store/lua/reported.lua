--- REPORTED: a nested saga's report reached its parent (the parent's
--- command took it): it owes nothing any more.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] the report's token, now, ttl
---
--- Replies (a status alone):
---   reported  the report is settled
---   gone      no such report is owed (settled already, or a newer one
---             replaced it)
---
--- Transitions: ``rp``/``rpd`` cleared; the saga is rescored (a settled
--- one leaves :due).

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/rescore"

if hget('rp') ~= token then return 'gone' end
redis.call('HDEL', h, 'rp', 'rpd')
rescore()
return 'reported'
