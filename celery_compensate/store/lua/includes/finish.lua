--- @include "clock"
--- @include "owe"

--- The nested sagas of a saga that ended, and theirs, start to expire
--- with it (a nested saga is kept until its outermost saga ends: its
--- parent may still undo it as a unit).
local function expire_kids(key, id, kids, t)
  for j in string.gmatch(kids, '%d+') do
    local ck, cid = key .. '~' .. j, id .. '~' .. j
    if redis.call('EXPIRE', ck, ttl) == 1 then
      redis.call('ZREM', idx, cid)
      redis.call('ZREM', live, cid)
      redis.call('ZADD', ends, string.format('%.3f', t + tonumber(ttl)), cid)
      local more = redis.call('HGET', ck, 'kids')
      if more then expire_kids(ck, cid, more, t) end
    end
  end
end

--- The saga ends in ``state``: written with the field-value pairs of
--- ``set`` (what the caller still has to write) in one HSET; the record
--- starts to expire and moves from the live to the expiry index.  A
--- nested saga is kept instead, and owes its parent a report.  ``fam``:
--- the ``up`` and ``kids`` fields, when the caller read them already.
local function finish(state, id, set, fam)
  set = set or {}
  set[#set + 1] = 'state'; set[#set + 1] = state
  set[#set + 1] = 'ended'; set[#set + 1] = now
  set[#set + 1] = 'fin'; set[#set + 1] = token
  redis.call('HSET', h, unpack(set))
  fam = fam or redis.call('HMGET', h, 'up', 'kids')
  redis.call('ZREM', live, id)
  if owe(fam[1] or false) then return end
  redis.call('EXPIRE', h, ttl)
  redis.call('ZREM', idx, id)
  local t = clock()
  redis.call('ZADD', ends, string.format('%.3f', t + tonumber(ttl)), id)
  if fam[2] then expire_kids(h, id, fam[2], t) end
end
