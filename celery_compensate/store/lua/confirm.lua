--- CONFIRM: step i's task succeeded in a worker, so whatever its completion
--- dispatched was published (the publish happens inside the task, before
--- it returns).  The members of the stage it dispatched that no worker
--- received yet leave the outbox: from now on they wait in the broker
--- under the queue lease.  Sent by the worker's main process with its
--- heartbeat, for every saga step that succeeded there.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl (unused); ARGV[4] step index, or -1: the
---   saga's first stage, published by the process that started it (a
---   nested saga's, which starts in the outbox)
---
--- Replies (a status alone):
---   confirmed  members of the stage it dispatched left the outbox
---   gone       its completion dispatched nothing still in the outbox
---
--- Transitions: forward R in the outbox -> R queued.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/wait_lease"
--- @include "includes/lower"

local i = ARGV[4]
local nk = 0
if i ~= '-1' then
  local k = tonumber(hget('k' .. i) or '')
  if not k then return 'gone' end
  nk = k + 1
  if hget('pb' .. nk) ~= i then return 'gone' end
end
local n = 0
for j in string.gmatch(hget('g' .. nk) or '', '%d+') do
  if hget('ob' .. j) == '1' then
    redis.call('HDEL', h, 'ob' .. j)
    if hget('s' .. j) == 'R' and not hget('h' .. j) then
      wait_lease(j, hget('c' .. j))
      lower(hget('d' .. j))
    end
    n = n + 1
  end
end
if n == 0 then return 'gone' end
return 'confirmed'
