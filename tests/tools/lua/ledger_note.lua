--- Append an execution event to the ledger once per token.
--- KEYS[1] ledger, KEYS[2] replies; ARGV[1] token, ARGV[2] entry
--- Returns 1.
if redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 1 then
  redis.call('RPUSH', KEYS[1], ARGV[2])
end
return 1
