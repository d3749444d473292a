--- UNWIND: a parent undoes its nested saga, the "undo" of the step the
--- child is: a completed child compensates as a unit (its completed steps
--- undone in reverse, as its own compensation), a child that compensated
--- already is reported undone, one that is COMPENSATION_FAILED is
--- reported failed or, on an operator's retry of the parent (a later
--- attempt), re-driven.  The parent's undo attempt is held by the child
--- from here on (no deadline: the child reports when it settles).
---
--- KEYS[1-4] the child's hash, :due, :live, :ends (see includes/saga.lua);
---   KEYS[5] :sagas (unused); KEYS[6] the parent's hash (the same shard)
--- ARGV[1-3] token, now, ttl; ARGV[4] the child's step index in the
---   parent; ARGV[5] the parent's undo attempt
---
--- Replies {status, old state, new state, {}, {}, the child's undos due}:
---   unwinding  the completed child compensates (also for this call sent
---              again): its undos are due
---   redriven   the child was COMPENSATION_FAILED and this is a later
---              attempt of the parent's undo (an operator's retry): it
---              compensates again, as by RETRY
---   waiting    the child compensates already: it reports when it settles
---   report     the child is settled for this attempt (COMPENSATED, or
---              COMPENSATION_FAILED): it owes its parent the report now
---   gone       no such child (never started, or a leftover of an earlier
---              saga with the parent's id): nothing to undo; the
---              parent's undo keeps its lease until the caller records it
---              done
---   stale      the parent's undo is not in flight at this attempt:
---              nothing changed
---
--- Transitions: parent undo Q/W -> R held by the child (``h<i>`` ``~``);
--- child COMPLETED -> COMPENSATING (``ua``, claimed, its last stage
--- opened and walked down, possibly -> COMPENSATED); child
--- COMPENSATION_FAILED -> COMPENSATING (re-driven); ``ua`` = the attempt.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/rescore"
--- @include "includes/claim"
--- @include "includes/advance"
--- @include "includes/replay"
--- @include "includes/redrive"
--- @include "includes/owe"

local parent, i, a = KEYS[6], ARGV[4], tonumber(ARGV[5])
local v = redis.call('HMGET', parent, 'x' .. i, 'a' .. i, 'h' .. i)
if tonumber(v[2] or '') ~= a
    or not (v[1] == 'Q' or v[1] == 'W' or (v[1] == 'R' and v[3] == '~')) then
  return {'stale'}
end
local st = hget('state')
-- no hold for a child that does not exist (or is a leftover of an earlier
-- saga with the parent's id: its ``ptk`` is not the parent's ``tok``): the
-- caller records the undo done, and if it dies first the undo's lease
-- sends it again
if not st or hget('ptk') ~= redis.call('HGET', parent, 'tok') then
  return {'gone'}
end
if v[1] ~= 'R' then
  redis.call('HSET', parent, 'x' .. i, 'R', 'h' .. i, '~', 'b' .. i, now)
  redis.call('HDEL', parent, 'd' .. i)
end
-- its parent waits for it again (reopened and retried after its root had
-- ended): it reports again, and is kept until then
if redis.call('HDEL', h, 'xp') == 1 then
  redis.call('PERSIST', h)
  redis.call('ZREM', ends, hget('id'))
end
if hget('claim') == token then
  return replay('unwinding', st, 'claim', 'COMPLETED')
end
if hget('rt') == token then
  return replay('redriven', st, 'rt', 'COMPENSATION_FAILED')
end
local ua = num('ua')
if st == 'COMPLETED' then
  -- the report of its completion was acted on: it is moot now
  redis.call('HDEL', h, 'rp', 'rpd')
  redis.call('HSET', h, 'ua', a)
  redis.call('ZADD', live, hget('created'), hget('id'))
  claim(nil, 'undone as a unit: its parent compensates')
  local out = {}
  open_stage(num('cur'), out)
  advance(out)
  rescore()
  return {'unwinding', st, hget('state'), {}, {}, out}
end
if st == 'COMPENSATION_FAILED' and ua > 0 and ua < a then
  redis.call('HDEL', h, 'rp', 'rpd')
  redis.call('HSET', h, 'ua', a)
  local out = {}
  local bad = redrive(out)
  if bad then return bad end
  rescore()
  return {'redriven', st, hget('state'), {}, {}, out}
end
redis.call('HSET', h, 'ua', a)
if st == 'COMPENSATED' or st == 'COMPENSATION_FAILED' then
  owe()
  return {'report', st, st}
end
return {'waiting', st, st}
