--- SCAN: one shard of the deadline index: the sagas whose earliest lease
--- lapsed.  A long gap since the last sweep means Redis was unreachable
--- (or no worker swept): then nothing is returned until ``hold`` seconds
--- have passed, so live workers renew their leases first.  Also drops
--- expired sagas from the listing index.
---
--- KEYS[1] ``:due``, KEYS[2] ``:sweep`` (the shard's sweep record; it
---   expires after ARGV[4] seconds, and a missing one also means a gap),
---   KEYS[3] ``:sagas``, KEYS[4] ``:ends``
--- ARGV[1] most saga ids to return, ARGV[2] gap, ARGV[3] hold, ARGV[4]
---   sweep record TTL, ARGV[5] most expired entries to drop
---
--- Reply {seconds still held ('0' when sweeping), saga ids due}.
---
--- Transitions: none (the sweep calls recover on each id).
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf',
                        string.format('%.3f', now), 'LIMIT', 0, ARGV[5])
if #gone > 0 then
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('ZREM', KEYS[4], unpack(gone))
end
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or '')
local hold = tonumber(redis.call('HGET', KEYS[2], 'hold') or '0')
if last == nil or now - last > tonumber(ARGV[2]) then
  hold = now + tonumber(ARGV[3])
end
redis.call('HSET', KEYS[2], 'last', string.format('%.3f', now),
           'hold', string.format('%.3f', hold))
redis.call('EXPIRE', KEYS[2], ARGV[4])
if now < hold then return {string.format('%.3f', hold - now), {}} end
return {'0', redis.call('ZRANGEBYSCORE', KEYS[1], '-inf',
                        string.format('%.3f', now), 'LIMIT', 0, ARGV[1])}
