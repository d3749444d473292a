--- The running saga gives up: compensation is claimed by this call (step
--- ``failed`` failed, or nil for an abort).
local function claim(failed, reason)
  redis.call('HSET', h, 'state', 'COMPENSATING', 'reason', reason,
             'cstart', now, 'claim', token)
  if failed then redis.call('HSET', h, 'failed', failed) end
end
