--- A forward effect of the chaos shop, applied once per token and step.
--- KEYS[1] effects, KEYS[2] ledger, KEYS[3] replies
--- ARGV[1] token, ARGV[2] '<saga no>:<step>', ARGV[3] entry JSON
--- Returns 'do' (applied) or 'do-skip' (already applied); a resent call
--- answers again.
local r = redis.call('HGET', KEYS[3], ARGV[1])
if r then return r end
local kind = 'do-skip'
if redis.call('HSETNX', KEYS[1], 'do:' .. ARGV[2], ARGV[1]) == 1 then
  kind = 'do'
end
redis.call('RPUSH', KEYS[2], kind .. ' ' .. ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], kind)
return kind
