--- @include "clock"

--- The saga ends in ``state``: written with the field-value pairs of
--- ``set`` (what the caller still has to write) in one HSET; the record
--- starts to expire and moves from the live to the expiry index.
local function finish(state, id, set)
  set = set or {}
  set[#set + 1] = 'state'; set[#set + 1] = state
  set[#set + 1] = 'ended'; set[#set + 1] = now
  set[#set + 1] = 'fin'; set[#set + 1] = token
  redis.call('HSET', h, unpack(set))
  redis.call('EXPIRE', h, ttl)
  redis.call('ZREM', idx, id)
  redis.call('ZREM', live, id)
  redis.call('ZADD', ends, string.format('%.3f', clock() + tonumber(ttl)), id)
end
