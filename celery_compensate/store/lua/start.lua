--- START: store a new saga with its first stage dispatched.
---
--- KEYS[1] the saga hash, KEYS[2] ``:due``, KEYS[3] ``:live``, KEYS[4]
---   ``:ends``, KEYS[5] ``:sagas`` of its shard
--- ARGV[1] token, ARGV[2] saga id, ARGV[3] a JSON array of field, value,
---   ... (strings; one argument packs far faster than a hundred)
---
--- Replies:
---   created   the saga is stored (also for the same call sent again)
---   exists    a saga with this id exists already: nothing written
---
--- Transitions: (none) -> RUNNING; stage 0 steps P -> R (queued: each may
--- wait ``qt`` plus its countdown in the broker); indexed in :due, :live
--- and :sagas; a reused id is taken out of :ends.
local h = KEYS[1]
if redis.call('EXISTS', h) == 1 then
  if redis.call('HGET', h, 'tok') == ARGV[1] then return 'created' end
  return 'exists'
end
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', h, 'tok', ARGV[1], 'id', ARGV[2])
local fields = cjson.decode(ARGV[3])
for j = 1, #fields, 1000 do
  redis.call('HSET', h, unpack(fields, j, math.min(j + 999, #fields)))
end
-- the first stage is dispatched: it may wait qt (+ countdown) in the broker
local first
local qt = tonumber(redis.call('HGET', h, 'qt'))
for i in string.gmatch(redis.call('HGET', h, 'g0'), '%d+') do
  local d = now + qt + tonumber(redis.call('HGET', h, 'c' .. i) or '0')
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
