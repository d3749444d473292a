--- FORGET: delete a finished saga's record and its index entries
--- (``SagaResult.forget()``), in one step, so a saga is never half gone.
---
--- KEYS[1-5] saga hash, :due, :live, :ends, :sagas (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl (unused)
---
--- Replies {status, state}:
---   forgotten     it was COMPLETED, COMPENSATED or COMPENSATION_FAILED
---                 (the last gives up on its failed undos): deleted
---   not-finished  it is RUNNING or COMPENSATING, or it is a nested saga
---                 whose outermost saga has not ended (no ``xp``: its
---                 parent may still undo it, or waits for its report):
---                 nothing changed
---   missing       no such saga
---
--- Transitions: a final saga -> (missing), with its nested sagas (a
--- saga started again with its id must not find them).

--- @include "includes/saga"
--- @include "includes/tree"

local st = redis.call('HGET', h, 'state')
if not st then return {'missing'} end
if st == 'RUNNING' or st == 'COMPENSATING' then return {'not-finished', st} end
-- a nested saga starts to expire only with its outermost saga (``xp``:
-- that one ended, and this one waits for an operator)
if redis.call('HEXISTS', h, 'up') == 1 and redis.call('TTL', h) < 0
    and redis.call('HEXISTS', h, 'xp') == 0 then
  return {'not-finished', st}
end
delete_tree(h, redis.call('HGET', h, 'id'), {idx, live, ends, KEYS[5]})
return {'forgotten', st}
