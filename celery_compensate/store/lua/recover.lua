--- RECOVER: the sweep found the saga due; act on every lease that lapsed
--- (checked again here, atomically).  A forward step still in the outbox
--- (its publisher died before confirming) is published again; one that
--- was queued or held and nobody holds any more is given up (the saga
--- compensates; its undo runs only if it opted in to
--- compensate_on_failure, as the step may never have run); a queued or
--- waiting undo is sent again (only one copy can begin); a running undo
--- whose worker died counts as a failed attempt.  What is settled or still
--- running elsewhere is left alone, so a stalled compensation resumes
--- where it stopped.
---
--- KEYS[1-5] saga hash, :due, :live, :ends, :sagas (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] saga id; ARGV[5] max undo attempts;
---   ARGV[6], ARGV[7] the undo retry backoff and its cap (seconds), also
---   the backoff of forward attempts past the pivot; ARGV[8] forward
---   attempts per step past the pivot
---
--- Replies {status, old state, new state, the results of the stage
--- before the current one, {index, spec, generation} of each forward step
--- to publish again, undos to publish, forward steps given up}:
---   recovered  acted on what lapsed (possibly nothing)
---   inactive   the saga is not RUNNING or COMPENSATING: rescored only
---   stuck      nothing in flight, yet not settled (a damaged record):
---              the caller quarantines it
---   report     a nested saga settled and its report to its parent is
---              overdue (its reporter died): the caller reports it
---   missing    no such saga: its index entries are dropped
---
--- Transitions: step R in the outbox -> R queued, published again
--- (``pg`` + 1); past a completed pivot, a lost step stays R, published
--- again after the backoff (``fa``, ``pg`` + 1), or R -> F with saga
--- RUNNING -> FORWARD_FAILED; step R -> F (lost; saga RUNNING ->
--- COMPENSATING); undo
--- Q/W re-sent (queued lease); undo R -> W (a + 1, sent after the backoff
--- a failed attempt gets) or -> F with saga -> COMPENSATION_FAILED; then
--- as step_failed (open the stage, walk down).  A step or undo a nested
--- saga holds (``h<i>`` ``~``) has no lease here: the child reports.

--- @include "includes/saga"
--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/clock"
--- @include "includes/wait_lease"
--- @include "includes/undo_wait"
--- @include "includes/describe"
--- @include "includes/rescore"
--- @include "includes/claim"
--- @include "includes/advance"
--- @include "includes/results"
--- @include "includes/forward"
--- @include "includes/compensation_failed"

if redis.call('EXISTS', h) == 0 then
  redis.call('ZREM', idx, ARGV[4])
  redis.call('ZREM', live, ARGV[4])
  redis.call('ZREM', KEYS[5], ARGV[4])
  return {'missing'}
end
-- one read for the state and a nested saga's owed report (``rp``,
-- ``rpd``): a sweep of a flat saga pays no extra command
local head = redis.call('HMGET', h, 'state', 'rp', 'rpd')
local st = head[1]
local owed = tonumber(head[3] or '')
if head[2] and owed and owed <= clock() then
  -- a nested saga settled and its reporter died: the caller reports it
  -- (the parent's command is idempotent by the report's token); the next
  -- sweep reports it again if this one dies too
  local d = string.format('%.3f', clock() + tonumber(hget('rg') or '60'))
  redis.call('HSET', h, 'rpd', d)
  redis.call('ZADD', idx, d, ARGV[4])
  return {'report', st, st}
end
if st ~= 'RUNNING' and st ~= 'COMPENSATING' then
  rescore()
  return {'inactive', st, st}
end
local t, out, lost, again = clock(), {}, {}, {}
local candidates = {}
local cur = num('cur')
if cur >= 0 then
  for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
    candidates[#candidates + 1] = i
  end
end
if num('late') > 0 then
  for i = 0, num('n') - 1 do
    if hget('l' .. i) == '1' then candidates[#candidates + 1] = tostring(i) end
  end
end
for _, i in ipairs(candidates) do
  local d = tonumber(hget('d' .. i) or '')
  local s, x = hget('s' .. i), hget('x' .. i) or ''
  if d and d <= t then
    if s == 'R' and not hget('h' .. i) and hget('ob' .. i) == '1'
        and pcall(cjson.decode, hget('p' .. i) or '') then
      -- dispatched by a completion whose worker never confirmed the
      -- publishing (it died in between), and no worker received it:
      -- publish it again; an older copy is refused when received (a spec
      -- that cannot be decoded cannot be published: it is given up below)
      local gen = math.max(num('pg' .. i), 1) + 1
      redis.call('HSET', h, 'pg' .. i, gen)
      redis.call('HDEL', h, 'ob' .. i)
      wait_lease(i, hget('c' .. i))
      again[#again + 1] = {tonumber(i), hget('p' .. i), gen}
    elseif s == 'R' and hget('state') == 'RUNNING' and past_pivot(i) then
      local why = hget('h' .. i) and
          ('lost: its worker died (no lease renewal for ' ..
           hget('o' .. i) .. 's)') or
          ('lost: no worker took it from the broker within ' ..
           hget('qt') .. 's')
      local entry = forward_retry(i, why, tonumber(ARGV[8]),
                                  tonumber(ARGV[6]), tonumber(ARGV[7]))
      if entry then again[#again + 1] = entry else lost[#lost + 1] = tonumber(i) end
    elseif s == 'R' then
      local why = 'lost: its worker died (no lease renewal for ' ..
                  hget('o' .. i) .. 's)'
      if not hget('h' .. i) then
        -- an abort's reason, when nobody received it during its grace
        why = hget('fe' .. i) or ('lost: no worker took it from the ' ..
                                  'broker within ' .. hget('qt') .. 's')
      end
      redis.call('HSET', h, 's' .. i, 'F', 'fe' .. i, why, 't' .. i, now,
                 'tk' .. i, token)
      redis.call('HINCRBY', h, 'w' .. hget('k' .. i), -1)
      if hget('state') == 'RUNNING' then claim(i, why) end
      lost[#lost + 1] = tonumber(i)
    elseif x == 'Q' or x == 'W' then
      undo_wait(i, 0)
      out[#out + 1] = describe(i, num('a' .. i))
    elseif x == 'R' and hget('state') ~= 'COMPENSATION_FAILED' then
      local a = num('a' .. i)
      local why = 'lost: the worker running attempt ' .. a .. ' died'
      redis.call('HSET', h, 'e' .. i, why, 'tu' .. i, token)
      if a - num('ab' .. i) >= tonumber(ARGV[5]) then
        redis.call('HSET', h, 'x' .. i, 'F')
        compensation_failed(hget('state'))
      else
        -- the backoff of a failed attempt (model.undo_delay): a worker
        -- that keeps dying must not burn the budget in seconds
        local delay = math.min(tonumber(ARGV[7]),
                               tonumber(ARGV[6]) * 2 ^ math.max(0, a - 1))
        redis.call('HSET', h, 'x' .. i, 'W', 'a' .. i, a + 1)
        undo_wait(i, delay)
        out[#out + 1] = describe(i, a + 1, delay)
      end
    end
  end
end
if hget('state') == 'COMPENSATING' and cur >= 0 then open_stage(cur, out) end
advance(out)
local now_st = hget('state')
--- Whether a nested saga holds a step or undo of the stage under work (it
--- has no deadline here: the child reports when it settles).
local function child_holds()
  for _, i in ipairs(candidates) do
    if hget('h' .. i) == '~' and (hget('s' .. i) == 'R'
                                  or hget('x' .. i) == 'R') then
      return true
    end
  end
  return false
end
if (now_st == 'RUNNING' or now_st == 'COMPENSATING') and not earliest()
    and not child_holds() then
  -- nothing in flight, yet not settled: a damaged record; the caller
  -- quarantines it rather than let it vanish from the index
  return {'stuck', st, now_st, {}, {}, out, lost}
end
rescore()
-- what the steps published again are called with: the stage before's
-- results, as when the stage was dispatched
local prev = {}
if #again > 0 then prev = stage_results(cur) end
return {'recovered', st, now_st, prev, again, out, lost}
