--- An undo effect of the chaos shop, deduplicated by idempotency key.
--- KEYS[1] effects, KEYS[2] ledger, KEYS[3] replies, KEYS[4] idempotency keys used
--- ARGV[1] token, ARGV[2] '<saga no>:<step>', ARGV[3] idempotency key
---   ('' if none), ARGV[4] entry JSON
--- Returns 'undo', 'undo-dedup' or 'undo-noop' (nothing to undo).
local r = redis.call('HGET', KEYS[3], ARGV[1])
if r then return r end
local kind
if ARGV[3] ~= '' and redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1 then
  kind = 'undo-dedup'
elseif redis.call('HEXISTS', KEYS[1], 'do:' .. ARGV[2]) == 0 then
  kind = 'undo-noop'
else
  redis.call('HINCRBY', KEYS[1], 'undo:' .. ARGV[2], 1)
  if ARGV[3] ~= '' then redis.call('SADD', KEYS[4], ARGV[3]) end
  kind = 'undo'
end
redis.call('RPUSH', KEYS[2], kind .. ' ' .. ARGV[4])
redis.call('HSET', KEYS[3], ARGV[1], kind)
return kind
