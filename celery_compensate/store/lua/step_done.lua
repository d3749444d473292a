--- STEP_DONE: a forward step's body returned.  Record it, move the saga's
--- deadline and say what is next, in one round trip: the per-step hot path.
---
--- KEYS[1-4] saga hash, :due, :live, :ends (see includes/saga.lua)
--- ARGV[1-3] token, now, ttl; ARGV[4] step index; ARGV[5] result JSON
---
--- Replies {status, old state, new state, results of the finished stage
--- ('' for the calling step's own: the caller has it), {index, spec} of
--- each step of the next stage, undos due}:
---   next           completed the last running member of its stage: publish
---                  the next stage with these results (RUNNING)
---   completed      completed the last stage: saga RUNNING -> COMPLETED
---   recorded       completed; other members of its stage still run
---   late           completed after compensation began: its undo is due
---                  (now, out of order, or after the running one: ``rd``)
---   replayed       this call was resent after its reply was lost (a
---                  resend whose first run completed the stage answers
---                  next/completed again while the next stage is still
---                  untouched in the outbox: see resend_stage)
---   duplicate      another call recorded this step already
---   not-dispatched a message for a step whose stage never started
---   unknown-step   the saga has no such step
---   missing        no such saga
---   error CORRUPT  the record lacks the step's stage, spec or counters
---
--- Transitions: step R -> D (F -> D for a late completer of a given-up
--- step); stage complete -> next stage P -> R (in the outbox) and
--- ``cur`` + 1, or saga RUNNING -> COMPLETED (expires, :live -> :ends);
--- saga COMPENSATING/COMPENSATED/COMPENSATION_FAILED: see ``late`` above;
--- saga FORWARD_FAILED -> RUNNING when the step that failed past the
--- pivot completes after all and no other member of its stage failed.

--- @include "includes/saga"
--- @include "includes/many"
--- @include "includes/clock"
--- @include "includes/finish"

local i = ARGV[4]
-- what the common case needs, in two reads
local f = redis.call('HMGET', h, 'state', 's' .. i, 'k' .. i, 'p' .. i,
                     'u' .. i, 'ns', 'id', 'qt', 'up', 'kids', 'xp')
local st, s, ns, id, qt = f[1], f[2], tonumber(f[6] or ''), f[7], f[8]
local k = tonumber(f[3] or '')
-- how many members of stage k run; the member lists (O(W) bytes) are
-- read only when the stage completes
local w = k and redis.call('HGET', h, 'w' .. k)

-- Stage k is complete: finish the saga, or mark the next stage dispatched
-- and hand it, with stage k's results, to the caller to publish.  The
-- next stage starts in the outbox (``ob``, ``pb``): until a worker
-- receives a member or the publisher's worker confirms it succeeded, each
-- member has its step lease (plus its countdown), after which the sweep
-- publishes it again: a publisher killed between this call and its
-- publishing does not strand the saga.
-- ``set`` holds the field-value pairs still to be written (this step's
-- record, in the common case): everything goes out in one HSET.
local function next_stage(set)
  local nk = k + 1
  local lists = redis.call('HMGET', h, 'g' .. k, 'g' .. nk)
  -- no member list for stage k: nothing written, the general path below
  -- reports the damaged record
  if not lists[1] then return nil end
  if nk < ns and not lists[2] then
    -- the step's own record is kept: a resent call finds it
    if #set > 0 then redis.call('HSET', h, unpack(set)) end
    return redis.error_reply('CORRUPT stage ' .. nk .. ' of the saga record '
                             .. 'has no steps')
  end
  set[#set + 1] = 'dn' .. k; set[#set + 1] = token
  if nk >= ns then
    if st ~= 'COMPLETED' then
      finish('COMPLETED', id, set, {f[9], f[10], f[11]})
    else
      redis.call('HSET', h, unpack(set))
    end
    return {'completed', 'RUNNING', 'COMPLETED'}
  end
  local want, steps = {}, {}
  for j in string.gmatch(lists[1], '%d+') do want[#want + 1] = 'r' .. j end
  local nres = #want
  for j in string.gmatch(lists[2], '%d+') do
    steps[#steps + 1] = j
    want[#want + 1] = 'c' .. j
    want[#want + 1] = 'p' .. j
    want[#want + 1] = 'o' .. j
    want[#want + 1] = 'pg' .. j
  end
  local v = many('HMGET', want)
  local results = {}
  local n = 0
  for j in string.gmatch(lists[1], '%d+') do
    n = n + 1
    -- this step's own result is not sent back (the caller has it): ''
    results[n] = (j == i and '') or v[n] or 'null'
  end
  local t, best, nxt = clock(), nil, {}
  set[#set + 1] = 'cur'; set[#set + 1] = nk
  set[#set + 1] = 'w' .. nk; set[#set + 1] = #steps
  set[#set + 1] = 'pb' .. nk; set[#set + 1] = i
  for m, j in ipairs(steps) do
    local o = nres + 4 * m - 1
    local d = t + tonumber(v[o] or qt) + tonumber(v[o - 2] or '0')
    set[#set + 1] = 's' .. j; set[#set + 1] = 'R'
    set[#set + 1] = 'd' .. j; set[#set + 1] = string.format('%.3f', d)
    set[#set + 1] = 'ob' .. j; set[#set + 1] = 1
    -- a member published before keeps its generation: no older copy
    -- runs beside it
    if v[o + 1] then
      nxt[#nxt + 1] = {tonumber(j), v[o - 1], tonumber(v[o + 1])}
    else
      nxt[#nxt + 1] = {tonumber(j), v[o - 1]}
    end
    if best == nil or d < best then best = d end
  end
  many('HSET', set)
  -- a running saga has nothing else in flight: its deadline is this stage's
  redis.call('ZADD', idx, string.format('%.3f', best), id)
  return {'next', 'RUNNING', 'RUNNING', results, nxt}
end

-- The common case, run before the helpers the others need are defined
-- (defining them costs about as much as running it): the last running
-- member of a stage of a running saga completes.
local set = {'s' .. i, 'D', 'r' .. i, ARGV[5], 't' .. i, now, 'tk' .. i, token}
if st == 'RUNNING' and s == 'R' and w == '1' and f[4] and f[5] then
  set[#set + 1] = 'w' .. k; set[#set + 1] = 0
  local reply = next_stage(set)
  if reply then return reply end
  set[#set] = nil; set[#set] = nil
end

--- @include "includes/fields"
--- @include "includes/num"
--- @include "includes/damaged"
--- @include "includes/rescore"
--- @include "includes/touch"
--- @include "includes/advance"
--- @include "includes/late_undo"
--- @include "includes/replay"

if not st then return {'missing'} end
if not s then return {'unknown-step', st, st} end
if not k or redis.call('HEXISTS', h, 'g' .. k) == 0
    or (w and not tonumber(w)) or not f[4]
    or not f[5] then
  return damaged(i)
end
-- A resent call whose first run completed stage k (its reply lost, or a
-- completion a worker's spool records late): the members of the next stage
-- still in the outbox as that run left them (not received, not published
-- again by the sweep) are handed out again with the same generation; a
-- stage that moved on is left alone, so a resend however late never runs
-- a body twice nor takes a hold from a running copy.
local function resend_stage()
  local nk = k + 1
  if nk >= ns then
    if st == 'COMPLETED' then return {'completed', 'RUNNING', 'COMPLETED'} end
    return nil
  end
  if st ~= 'RUNNING' or tonumber(hget('cur') or '') ~= nk then return nil end
  local lists = redis.call('HMGET', h, 'g' .. k, 'g' .. nk)
  if not lists[1] or not lists[2] then return nil end
  local nxt, t = {}, clock()
  for j in string.gmatch(lists[2], '%d+') do
    local v = redis.call('HMGET', h, 's' .. j, 'h' .. j, 'ob' .. j, 'p' .. j,
                         'pg' .. j, 'o' .. j, 'c' .. j)
    if v[1] == 'R' and not v[2] and v[3] == '1' then
      nxt[#nxt + 1] = v[5] and {tonumber(j), v[4], tonumber(v[5])}
                      or {tonumber(j), v[4]}
      -- handed out afresh: its outbox lease starts again, as the copy's
      -- header says (a copy inside it runs without reading the record)
      local d = string.format('%.3f', t + tonumber(v[6] or qt)
                                      + tonumber(v[7] or '0'))
      redis.call('HSET', h, 'd' .. j, d)
      lower(d)
    end
  end
  if #nxt == 0 then return nil end
  local results = {}
  for j in string.gmatch(lists[1], '%d+') do
    results[#results + 1] = hget('r' .. j) or 'null'
  end
  return {'next', 'RUNNING', 'RUNNING', results, nxt}
end

if s == 'D' then
  if hget('tk' .. i) ~= token then return {'duplicate', st, st} end
  if hget('dn' .. k) == token then
    local again = resend_stage()
    if again then return again end
  end
  return replay('replayed', st)
end
if s == 'P' and st == 'RUNNING' then
  -- a message for a step whose stage was never dispatched (stale or
  -- forged): recording it would dispatch the stage after it early
  return {'not-dispatched', st, st}
end
redis.call('HSET', h, unpack(set))
local left = tonumber(w or '0')
if s == 'R' then left = redis.call('HINCRBY', h, 'w' .. k, -1) end
if st == 'RUNNING' then
  if left <= 0 then return next_stage({}) end
  -- other members run: the saga's :due entry stays a lower bound (O(1))
  return {'recorded', st, st}
end
if st == 'FORWARD_FAILED' and s == 'F' then
  -- the step that failed past the pivot completed after all (a copy taken
  -- for lost): forward again, unless another member of its stage failed
  for j in string.gmatch(hget('g' .. k) or '', '%d+') do
    if hget('s' .. j) == 'F' then return {'late', st, st, {}, {}, {}} end
  end
  redis.call('HSET', h, 'state', 'RUNNING')
  redis.call('HDEL', h, 'ended', 'reason', 'failed')
  if left <= 0 then
    local r = next_stage({})
    if r then r[2] = st end
    return r
  end
  rescore()
  return {'recorded', st, 'RUNNING'}
end
-- A late completer: compensation began while this step was running, or
-- the step had been given up (lost, aborted) and ran after all.
local out = {}
local cur0 = hget('cur')
local cur = tonumber(cur0 or '0')
if f[5] ~= '0' then
  local x = hget('x' .. i) or ''
  if x == '' then
    if k == cur then
      open_member(i, k, out)
    elseif k > cur then
      -- its stage was already settled without it: undo it out of order
      late_undo(i, 1, out)
    end
  elseif s == 'F' then
    -- undone as a failed step (compensate_on_failure), then it took
    -- effect after all: undo it once more, after the running (or failed)
    -- undo
    if x == 'D' then
      late_undo(i, num('a' .. i) + 1, out)
    else
      redis.call('HSET', h, 'rd' .. i, 1)
    end
  end
end
advance(out)
touch(st, cur0, out)
return {'late', st, hget('state'), {}, {}, out}
