--- @include "clock"
--- @include "owe"

--- The nested sagas of a saga whose outermost saga ended, and theirs,
--- start to expire with it (a nested saga is kept until then: its parent
--- may still undo it as a unit).  A child still at work (a late completer
--- reopened it) is only marked ``xp``: it expires when it ends.
local function expire_kids(key, id, kids, t)
  for j in string.gmatch(kids, '%d+') do
    local ck, cid = key .. '~' .. j, id .. '~' .. j
    local v = redis.call('HMGET', ck, 'state', 'kids')
    if v[1] then
      redis.call('HSET', ck, 'xp', 1)
      if v[1] == 'COMPLETED' or v[1] == 'COMPENSATED' then
        redis.call('EXPIRE', ck, ttl)
        redis.call('ZREM', idx, cid)
        redis.call('ZREM', live, cid)
        redis.call('ZADD', ends, string.format('%.3f', t + tonumber(ttl)),
                   cid)
        if v[2] then expire_kids(ck, cid, v[2], t) end
      end
    end
  end
end

--- The saga ends in ``state``: written with the field-value pairs of
--- ``set`` (what the caller still has to write) in one HSET; the record
--- starts to expire and moves from the live to the expiry index, with its
--- nested sagas.  A nested saga is kept instead, and owes its parent a
--- report, unless its outermost saga ended already (``xp``).  ``fam``:
--- the ``up``, ``kids`` and ``xp`` fields, when the caller read them.
local function finish(state, id, set, fam)
  set = set or {}
  set[#set + 1] = 'state'; set[#set + 1] = state
  set[#set + 1] = 'ended'; set[#set + 1] = now
  set[#set + 1] = 'fin'; set[#set + 1] = token
  redis.call('HSET', h, unpack(set))
  fam = fam or redis.call('HMGET', h, 'up', 'kids', 'xp')
  redis.call('ZREM', live, id)
  if fam[1] and not fam[3] and owe(fam[1]) then return end
  redis.call('EXPIRE', h, ttl)
  redis.call('ZREM', idx, id)
  local t = clock()
  redis.call('ZADD', ends, string.format('%.3f', t + tonumber(ttl)), id)
  if fam[2] then expire_kids(h, id, fam[2], t) end
end
