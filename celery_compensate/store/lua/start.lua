--- START: store a new saga with its first stage dispatched.
---
--- KEYS[1] the saga hash, KEYS[2] ``:due``, KEYS[3] ``:live``, KEYS[4]
---   ``:ends``, KEYS[5] ``:sagas`` of its shard; for a nested saga KEYS[6]
---   its parent's hash (the same shard: see layout.shard_of)
--- ARGV[1] token, ARGV[2] saga id, ARGV[3] a JSON array of field, value,
---   ... (strings; one argument packs far faster than a hundred); ARGV[4]
---   for a nested saga, its step index in the parent (else absent)
---
--- Replies:
---   created   the saga is stored (also for the same call sent again)
---   exists    a saga with this id exists already: nothing written (a
---             nested saga left by an earlier saga with its parent's id,
---             ``ptk`` not the parent's ``tok``, is replaced instead)
---   busy      a leftover (as above) still RUNNING or COMPENSATING, or
---             with a nested saga that is: nothing written; the caller
---             fails the step
---   orphan    a nested saga whose parent no longer waits for it (the
---             parent is not RUNNING, or the step is settled or held):
---             nothing written
---
--- Transitions: (none) -> RUNNING; stage 0 steps P -> R (queued: each may
--- wait ``qt`` plus its countdown in the broker; a nested saga's are in
--- the outbox, as a stage a completion dispatched, since its starter is a
--- worker that can die before publishing them); indexed in :due, :live
--- and :sagas; a reused id is taken out of :ends.  A nested saga's step in
--- its parent becomes held by it (``h<i>`` ``~``, no deadline, out of the
--- outbox) in the same call.

--- @include "includes/tree"
--- @include "includes/busy"

local h = KEYS[1]
if redis.call('EXISTS', h) == 1 then
  if redis.call('HGET', h, 'tok') == ARGV[1] then return 'created' end
  -- a nested saga left by an earlier saga with its parent's id (that one
  -- was forgotten, or expired before it) is replaced; one this parent
  -- started (its creation token, ``ptk``) is the same child started again
  if not ARGV[4] or redis.call('HGET', h, 'ptk')
      == redis.call('HGET', KEYS[6], 'tok') then
    return 'exists'
  end
  -- a leftover still at work, or with a nested saga at work (an undo of
  -- it may be running), is not replaced: what it settles must not land
  -- on the new child
  if tree_at_work(h) then return 'busy' end
end
if redis.replicate_commands then redis.replicate_commands() end
local up = ARGV[4]
if up then
  local parent = KEYS[6]
  local v = redis.call('HMGET', parent, 'state', 's' .. up, 'h' .. up)
  if v[1] ~= 'RUNNING' or v[2] ~= 'R' or v[3] then return 'orphan' end
  -- a leftover (see above) goes with its own nested sagas
  delete_tree(h, ARGV[2], {KEYS[2], KEYS[3], KEYS[4], KEYS[5]})
  redis.call('HSET', parent, 'h' .. up, '~')
  redis.call('HDEL', parent, 'd' .. up, 'ob' .. up)
end
redis.call('HSET', h, 'tok', ARGV[1], 'id', ARGV[2])
if up then
  redis.call('HSET', h, 'ptk', redis.call('HGET', KEYS[6], 'tok'))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local fields = cjson.decode(ARGV[3])
for j = 1, #fields, 1000 do
  redis.call('HSET', h, unpack(fields, j, math.min(j + 999, #fields)))
end
-- the first stage is dispatched: it may wait qt (+ countdown) in the broker
local first
local qt = tonumber(redis.call('HGET', h, 'qt'))
for i in string.gmatch(redis.call('HGET', h, 'g0'), '%d+') do
  local wait = qt
  if up then
    -- in the outbox: its step lease, then the sweep publishes it again
    wait = tonumber(redis.call('HGET', h, 'o' .. i) or qt)
    redis.call('HSET', h, 'ob' .. i, 1)
  end
  local d = now + wait + tonumber(redis.call('HGET', h, 'c' .. i) or '0')
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d))
  if first == nil or d < first then first = d end
end
redis.call('ZADD', KEYS[2], string.format('%.3f', first), ARGV[2])
local created = redis.call('HGET', h, 'created') or string.format('%.6f', now)
redis.call('ZADD', KEYS[3], created, ARGV[2])
redis.call('ZADD', KEYS[5], created, ARGV[2])
-- the id may be reused after its record expired: the sweep must not trim
-- the new saga from the listing
redis.call('ZREM', KEYS[4], ARGV[2])
return 'created'
