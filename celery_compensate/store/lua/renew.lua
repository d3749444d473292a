--- RENEW: a live worker still holds step i's forward task (ARGV[5] empty)
--- or attempt ARGV[5] of its undo: extend the lease, never shorten it.
--- Sent in one pipeline per heartbeat for everything a worker holds.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl (unused); ARGV[4] step index; ARGV[5] the
---   undo attempt, or '' for the forward task; ARGV[6] the holder (see
---   receive.lua), taken when nobody holds it yet
---
--- Replies (a status alone):
---   renewed  the lease was extended (the first renewal marks it held)
---   gone     the step or attempt is no longer in flight
---
--- Transitions: queued -> held (``h<i>``, lease ``o<i>``/``ou<i>``); a
--- held lease moves later.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/inflight"
--- @include "includes/hold_lease"
--- @include "includes/lower"

if redis.call('EXISTS', h) == 0 then return 'gone' end
local i = ARGV[4]
local field = 'o'
if ARGV[5] == '' then
  if hget('s' .. i) ~= 'R' then return 'gone' end
else
  if not inflight(hget('x' .. i) or '') or hget('a' .. i) ~= ARGV[5] then
    return 'gone'
  end
  field = 'ou'
end
if not hget('h' .. i) then
  -- a worker took it from the broker unseen (its RECEIVE failed): from
  -- now on its lease is short
  lower(hold_lease(i, field, ARGV[6]))
  if field == 'o' then redis.call('HDEL', h, 'ob' .. i, 'fe' .. i) end
  return 'renewed'
end
-- a later lease: the saga's entry in :due stays (a lower bound), O(1)
local d = clock() + tonumber(hget(field .. i))
if d > tonumber(hget('d' .. i) or '0') then
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d))
end
return 'renewed'
