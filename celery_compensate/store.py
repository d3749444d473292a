"""The saga store: one Redis hash per saga, advanced only by Lua scripts.

Every saga lives in a single hash, ``<prefix>:{<shard>}:saga:<saga_id>``,
next to its shard's sorted sets of saga ids:

- ``:due``: sagas with something in flight, scored by its earliest lease
  (the recovery sweep reads it);
- ``:live``: sagas not finished (running, compensating, waiting for an
  operator), scored by creation time (``compensate list``);
- ``:sagas``: every stored saga, scored by creation time, and ``:ends``:
  finished ones scored by when their record expires (the sweep trims both).

All share the hash tag ``{<shard>}``, so each script touches one Redis
Cluster slot; a finished saga expires as a whole.  Fields (``i`` a step
index, ``k`` a stage index):

=========== ==============================================================
``id``      the saga id; ``state`` a :class:`~celery_compensate.model.SagaState`
``n/ns``    number of steps / stages; ``qt`` seconds a message may wait
            in the broker before a worker takes it
``created`` when started; ``ended`` when finished (or became
            COMPENSATION_FAILED); ``reason`` why it compensates (an undo's
            errors are its ``e<i>``); ``failed`` the failed step;
            ``retries`` operator retries
``cur``     highest dispatched stage; during compensation the stage whose
            undos are running (``-1`` once every stage is settled)
``g<k>``    comma-separated step indices of stage ``k``
``w<k>``    forward members of stage ``k`` not yet settled
``y<k>``    undos of stage ``k`` not yet done
``late``    undos of late completers run out of order, not yet done
``p<i>``    the step's spec (JSON)
``k<i>``    its stage; ``u<i>`` 0 no undo, 1 undo, 2 undo also on failure
``o<i>``    its lease once held; ``ou<i>`` its undo's; ``c<i>`` countdown
``d<i>``    deadline of what is in flight for step ``i`` (forward task or
            undo); ``h<i>`` ``1`` once a worker holds it
``s<i>``    forward state (StepState); ``r<i>`` result JSON; ``t<i>``
            when settled; ``fe<i>`` why it failed
``x<i>``    undo state (UndoState); ``a<i>`` current attempt; ``ab<i>``
            attempts spent before the last operator retry; ``b<i>``
            started; ``z<i>`` undone at; ``e<i>`` last undo error;
            ``l<i>`` ``1`` when it is a late, out-of-order undo; ``rd<i>``
            ``1``: undo again once the running undo ends
tokens      of the call that made a change, so that a resent call (its
            reply lost) answers again: ``tok`` created, ``tk<i>`` settled
            step ``i``, ``dn<k>`` completed stage ``k``, ``claim`` claimed
            compensation, ``fin`` finished the saga, ``cf`` made it
            COMPENSATION_FAILED, ``tb<i>`` let the running copy of an undo
            in, ``tu<i>`` settled an undo attempt, ``rt`` retried by an
            operator
=========== ==============================================================

Transitions are written once, in Lua; Python only reads their replies.
"""
from __future__ import annotations

import heapq
import math
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import redis
from celery.utils.log import get_logger
from kombu.utils.json import dumps, loads
from .clients import connect
from .exceptions import (
    CorruptSagaRecord, SagaNotFound, SagaStoreError, SagaStoreUnavailable,
)
from .model import (
    Plan, SagaState, StepSpec, StepState, UndoState, step_task_id, undo_task_id,
)
from .settings import Settings

__all__ = ('SagaStore', 'Outcome', 'UndoDue', 'SagaRecord', 'StepRecord',
           'Listed',
           'SHARDS', 'shard_of', 'new_token', 'make_client')

logger = get_logger(__name__)

# Helpers shared by the scripts that change a saga (prepended to each).
# Every such script takes ARGV[1] a token unique to the call, ARGV[2] now,
# ARGV[3] the TTL of finished sagas.  The token makes a call safe to send
# twice (redis-py resends a command whose reply was lost): the second run
# finds its own token and answers again instead of reporting a duplicate.
_LIB = r"""
local h, idx, live, ends = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local function hget(f) return redis.call('HGET', h, f) end
local function num(f) return tonumber(redis.call('HGET', h, f) or '0') end
if redis.replicate_commands then redis.replicate_commands() end

-- Leases are measured on the Redis clock, so workers' clocks may differ.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Step i's forward task or undo was just sent: until a worker holds it,
-- it may wait in the broker for ``qt`` seconds (plus ``extra``: its
-- countdown) before the recovery sweep takes it for lost.
local function wait_lease(i, extra)
  local d = clock() + tonumber(hget('qt')) + tonumber(extra or 0)
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d))
  redis.call('HDEL', h, 'h' .. i)
end

-- A live worker holds it: it must renew within ``o<i>`` (``ou<i>`` for
-- the undo) seconds.
local function hold_lease(i, field)
  local d = clock() + tonumber(hget(field .. i))
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d), 'h' .. i, 1)
end

-- The fields every script relies on for step i, checked before anything
-- is written (a Lua error would leave the writes made before it).
local function damaged(i)
  local k = tonumber(hget('k' .. i) or '')
  local w = k and hget('w' .. k)
  if not k or not hget('g' .. k) or (w and not tonumber(w))
      or not hget('p' .. i) or not hget('u' .. i) then
    return redis.error_reply('CORRUPT step ' .. i .. ' of the saga record '
                             .. 'lacks its stage, spec or counters')
  end
end

local function inflight(x) return x == 'Q' or x == 'R' or x == 'W' end

-- HMGET, HSET and HDEL of many fields (unpack has a limit): 1000 at a time
local function many(cmd, list)
  local out = {}
  for first = 1, #list, 1000 do
    local last = math.min(first + 999, #list)
    local r = redis.call(cmd, h, unpack(list, first, last))
    if cmd == 'HMGET' then
      for n = 1, last - first + 1 do out[first + n - 1] = r[n] end
    end
  end
  return out
end

-- Keep the saga's entry in the deadline index at the earliest lease of
-- what it has in flight; take it out when nothing is (final states, and
-- COMPENSATION_FAILED, which waits for an operator).
local function earliest()
  local v = redis.call('HMGET', h, 'state', 'cur', 'late', 'n')
  local best = nil
  if v[1] ~= 'RUNNING' and v[1] ~= 'COMPENSATING' then return nil end
  -- read s/x/d/l of ``steps`` a batch at a time (unpack has a limit)
  local function scan(steps, late)
    for first = 1, #steps, 250 do
      local want = {}
      for n = first, math.min(first + 249, #steps) do
        local i = steps[n]
        want[#want + 1] = 's' .. i
        want[#want + 1] = 'x' .. i
        want[#want + 1] = 'd' .. i
        want[#want + 1] = 'l' .. i
      end
      local r = redis.call('HMGET', h, unpack(want))
      for m = 0, #want / 4 - 1 do
        local s, x = r[4 * m + 1], r[4 * m + 2] or ''
        local d = tonumber(r[4 * m + 3] or '')
        local counts
        if late then counts = r[4 * m + 4] == '1' and inflight(x)
        else counts = s == 'R' or inflight(x) end
        if counts and d and (best == nil or d < best) then best = d end
      end
    end
  end
  local cur = tonumber(v[2] or '0')
  if cur >= 0 then
    local steps = {}
    for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
      steps[#steps + 1] = i
    end
    scan(steps, false)
  end
  if tonumber(v[3] or '0') > 0 then
    local steps = {}
    for i = 0, tonumber(v[4] or '0') - 1 do steps[#steps + 1] = i end
    scan(steps, true)
  end
  return best
end

local function rescore()
  local best = earliest()
  if best then
    redis.call('ZADD', idx, string.format('%.3f', best), hget('id'))
  else
    redis.call('ZREM', idx, hget('id'))
  end
end

-- Describe an undo attempt of step i for the caller to publish: with the
-- results of the stage before, which the step was called with.
local function describe(i, attempt)
  local prev, k = {}, num('k' .. i)
  if k > 0 then
    for j in string.gmatch(hget('g' .. (k - 1)), '%d+') do
      prev[#prev + 1] = hget('r' .. j) or 'null'
    end
  end
  return {tonumber(i), hget('p' .. i), hget('r' .. i) or 'null', prev,
          attempt}
end

-- Make step i's undo due (first attempt).
local function due(i, out)
  redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, 1)
  wait_lease(i, 0)
  out[#out + 1] = describe(i, 1)
end

-- A finished saga has work again (a late undo): it stops expiring.
local function reopen()
  local id = hget('id')
  redis.call('PERSIST', h)
  redis.call('ZREM', ends, id)
  redis.call('ZADD', live, hget('created') or '0', id)
end

-- Undo step i out of order (attempt ``attempt``): it completed after its
-- stage had been settled without it.
local function late_undo(i, attempt, out)
  if hget('state') == 'COMPENSATION_FAILED' then
    -- nothing is sent while the saga waits for an operator: RETRY sends it
    redis.call('HSET', h, 'rd' .. i, 1)
    return
  end
  -- a fresh budget: the attempts of an earlier undo of the step don't count
  redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, attempt, 'ab' .. i,
             attempt - 1, 'l' .. i, 1)
  wait_lease(i, 0)
  redis.call('HINCRBY', h, 'late', 1)
  out[#out + 1] = describe(i, attempt)
  if hget('state') == 'COMPENSATED' then
    redis.call('HSET', h, 'state', 'COMPENSATING')
    reopen()
  end
end

-- The queued, not yet started undos (of the stage under compensation, and
-- late ones), for a call whose reply was lost.  Publishing one twice is
-- harmless: only one copy of an attempt can begin.
local function queued(out)
  local cur = num('cur')
  for i = 0, num('n') - 1 do
    if hget('x' .. i) == 'Q' and
        (num('k' .. i) == cur or hget('l' .. i) == '1') then
      out[#out + 1] = describe(i, num('a' .. i))
    end
  end
end

local function finish(state)
  local id = hget('id')
  redis.call('HSET', h, 'state', state, 'ended', now, 'fin', token)
  redis.call('EXPIRE', h, ttl)
  redis.call('ZREM', idx, id)
  redis.call('ZREM', live, id)
  redis.call('ZADD', ends, string.format('%.3f', clock() + tonumber(ttl)), id)
end


-- Stage k is being compensated: every member that completed (or failed
-- and opted in to compensate_on_failure) and has an undo not yet due
-- gets it now.  Idempotent.
local function open_stage(k, out)
  if hget('state') == 'COMPENSATION_FAILED' then return end
  for i in string.gmatch(hget('g' .. k) or '', '%d+') do
    local u = hget('u' .. i)
    if u ~= '0' and (hget('x' .. i) or '') == '' then
      local s = hget('s' .. i)
      if s == 'D' or (s == 'F' and u == '2') then
        due(i, out)
        redis.call('HINCRBY', h, 'y' .. k, 1)
      end
    end
  end
end

-- Move the cursor down over settled stages, opening each next one; once
-- every stage is settled the saga is COMPENSATED and starts to expire.
-- Nothing moves while the saga is COMPENSATION_FAILED.
local function advance(out)
  if hget('state') == 'COMPENSATION_FAILED' then return end
  local cur = num('cur')
  while cur >= 0 do
    if num('w' .. cur) > 0 or num('y' .. cur) > 0 then return end
    cur = cur - 1
    redis.call('HSET', h, 'cur', cur)
    if cur >= 0 then open_stage(cur, out) end
  end
  if num('late') > 0 then return end
  if hget('state') ~= 'COMPENSATED' then finish('COMPENSATED') end
end

-- The running saga gives up: compensation is claimed by this call.
local function claim(failed, reason)
  redis.call('HSET', h, 'state', 'COMPENSATING', 'reason', reason,
             'cstart', now, 'claim', token)
  if failed then redis.call('HSET', h, 'failed', failed) end
end

-- Answer a call sent again after its reply was lost: the queued undos
-- again, and the state its first run saw before (``before`` if that run
-- left ``marker`` set to this call's token).
local function replay(status, st, marker, before)
  local out = {}
  queued(out)
  local old = st
  if marker and hget(marker) == token then old = before end
  return {status, old, st, {}, {}, out}
end
"""


@dataclass(frozen=True)
class UndoDue:
    """An undo attempt that must be published now."""

    step: StepSpec
    result: Any
    prev: list[Any]         #: results of the stage before the step's
    attempt: int


@dataclass(frozen=True)
class Outcome:
    """What a script did to a saga and what must be published because of it.

    ``status`` names what happened (``recorded``, ``next``, ``completed``,
    ``late``, ``claimed``, ``settled``, ``duplicate``, ``missing`` ...).
    """

    status: str
    old_state: SagaState | None = None
    new_state: SagaState | None = None
    results: list[Any] = field(default_factory=list)
    forward: list[StepSpec] = field(default_factory=list)
    undos: list[UndoDue] = field(default_factory=list)
    #: steps given up by the call (lost by a dead worker, or aborted)
    stopped: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepRecord:
    """What the store knows about one step and its undo.

    Times are Unix timestamps; ``started_at`` is when the step's stage was
    dispatched (the saga's start, or when the stage before it completed).
    """

    index: int
    stage: int
    task_name: str
    task_id: str
    undo_name: str | None
    state: StepState
    result: Any             #: what the step returned: its undo gets it
    started_at: float | None
    settled_at: float | None
    failure: str | None
    undo_state: UndoState
    #: number of the current (or last) attempt, counted over operator
    #: retries; 0 while the undo is not due
    undo_attempts: int
    undo_task_id: str | None    #: of the current (last) attempt
    undo_started_at: float | None   #: when the current attempt began
    #: the last failed attempt's error (kept after a later success)
    undo_error: str | None
    undone_at: float | None

    @property
    def in_flight(self) -> bool:
        """Whether the step or its undo is dispatched and not settled."""
        return self.state is StepState.RUNNING or self.undo_state in (
            UndoState.QUEUED, UndoState.RUNNING, UndoState.WAITING)


@dataclass(frozen=True)
class SagaRecord:
    """A decoded saga hash."""

    saga_id: str
    state: SagaState
    created: float
    ended: float | None
    failed_step: int | None
    reason: str | None
    steps: list[StepRecord]
    #: operator retries (``compensate retry``) so far
    retries: int = 0

    @property
    def current(self) -> list[StepRecord]:
        """What the saga waits for: its steps in flight (running forward,
        or their undos queued or running), else the undos that failed for
        good (COMPENSATION_FAILED)."""
        busy = [s for s in self.steps if s.in_flight]
        return busy or [s for s in self.steps
                        if s.undo_state is UndoState.FAILED]


@dataclass(frozen=True)
class Listed:
    """One saga found by :meth:`SagaStore.list_sagas`: its record, or why
    the record could not be read."""

    saga_id: str
    created: float
    record: SagaRecord | None
    error: str | None = None

    @property
    def state(self) -> str:
        """The saga's state, or ``CORRUPT`` when its record is damaged."""
        return self.record.state.value if self.record else 'CORRUPT'


def _state(value: Any) -> SagaState | None:
    return SagaState(value) if value else None


class SagaStore:
    """Saga records in one Redis (one per app and process).

    Arguments:
        settings: the app's validated settings.
    """

    # Every script that changes a saga takes the same KEYS, all of the
    # saga's shard (one hash tag, so one Cluster slot): KEYS[1] the saga
    # hash, KEYS[2] the deadline index (``:due``), KEYS[3] the unfinished
    # sagas (``:live``), KEYS[4] the expiry index (``:ends``), KEYS[5] all
    # sagas (``:sagas``).

    #: KEYS[1-5] as above; ARGV[1] token, ARGV[2] saga id, ARGV[3] a JSON
    #: array of field, value, ... (strings; one argument packs far faster
    #: than a hundred).
    #: Returns 1 when created (also for the same call sent again), 0 when
    #: the saga id already exists.
    START = r"""
local h = KEYS[1]
if redis.call('EXISTS', h) == 1 then
  if redis.call('HGET', h, 'tok') == ARGV[1] then return 1 end
  return 0
end
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', h, 'tok', ARGV[1], 'id', ARGV[2])
local fields = cjson.decode(ARGV[3])
for j = 1, #fields, 1000 do
  redis.call('HSET', h, unpack(fields, j, math.min(j + 999, #fields)))
end
-- the first stage is dispatched: it may wait qt (+ countdown) in the broker
local first
local qt = tonumber(redis.call('HGET', h, 'qt'))
for i in string.gmatch(redis.call('HGET', h, 'g0'), '%d+') do
  local d = now + qt + tonumber(redis.call('HGET', h, 'c' .. i) or '0')
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d))
  if first == nil or d < first then first = d end
end
redis.call('ZADD', KEYS[2], string.format('%.3f', first), ARGV[2])
local created = redis.call('HGET', h, 'created') or string.format('%.6f', now)
redis.call('ZADD', KEYS[3], created, ARGV[2])
redis.call('ZADD', KEYS[5], created, ARGV[2])
-- the id may be reused after its record expired: the sweep must not trim
-- the new saga from the listing
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""

    #: The per-step hot path: record a completed step, move the saga's
    #: deadline and learn what next, in one round trip.
    #: ARGV[1-3] token, now, ttl; ARGV[4] step index, ARGV[5] result JSON.
    #: Returns {status, old state, new state, results of the finished
    #: stage, {index, spec} of the next stage, undos due}.
    STEP_DONE = r"""
-- The common case first, before the helpers below are defined (defining
-- them costs more than running it): a running step of a running saga
-- completes as the last of its stage.  Six calls: two reads, the clock, one
-- write, the deadline index (or expiry).  Anything else falls through.
do
  local h, idx, i = KEYS[1], KEYS[2], ARGV[4]
  local f = redis.call('HMGET', h, 'state', 's' .. i, 'k' .. i, 'p' .. i,
                       'u' .. i, 'ns', 'id', 'qt')
  local k = tonumber(f[3] or '')
  local g = k and f[1] == 'RUNNING' and f[2] == 'R' and f[4] and f[5]
            and redis.call('HMGET', h, 'g' .. k, 'w' .. k, 'g' .. (k + 1))
  if g and g[1] and g[2] == '1' then
    local nk, want, steps = k + 1, {}, {}
    local last = nk >= tonumber(f[6])
    if not last and g[3] then
      for j in string.gmatch(g[1], '%d+') do want[#want + 1] = 'r' .. j end
      for j in string.gmatch(g[3], '%d+') do
        steps[#steps + 1] = j
        want[#want + 1] = 'c' .. j
        want[#want + 1] = 'p' .. j
      end
    end
    if (last or g[3]) and #want <= 900 then
      if redis.replicate_commands then redis.replicate_commands() end
      local t = redis.call('TIME')
      local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
      local set = {'s' .. i, 'D', 'r' .. i, ARGV[5], 't' .. i, ARGV[2],
                   'tk' .. i, ARGV[1], 'w' .. k, 0, 'dn' .. k, ARGV[1]}
      if last then
        -- as finish('COMPLETED') below
        set[#set + 1] = 'state'; set[#set + 1] = 'COMPLETED'
        set[#set + 1] = 'ended'; set[#set + 1] = ARGV[2]
        set[#set + 1] = 'fin'; set[#set + 1] = ARGV[1]
        redis.call('HSET', h, unpack(set))
        redis.call('EXPIRE', h, ARGV[3])
        redis.call('ZREM', idx, f[7])
        redis.call('ZREM', KEYS[3], f[7])
        redis.call('ZADD', KEYS[4],
                   string.format('%.3f', clock + tonumber(ARGV[3])), f[7])
        return {'completed', 'RUNNING', 'COMPLETED'}
      end
      -- as next_stage() below; a stage never dispatched has no h<j>
      local v = redis.call('HMGET', h, unpack(want))
      local nres = #want - 2 * #steps
      local results, nxt, best = {}, {}, nil
      local n = 0
      for j in string.gmatch(g[1], '%d+') do
        n = n + 1
        -- this step's result is written below, with everything else
        results[n] = (j == i and ARGV[5]) or v[n] or 'null'
      end
      set[#set + 1] = 'cur'; set[#set + 1] = nk
      set[#set + 1] = 'w' .. nk; set[#set + 1] = #steps
      for n, j in ipairs(steps) do
        local d = clock + tonumber(f[8]) + tonumber(v[nres + 2 * n - 1] or '0')
        set[#set + 1] = 's' .. j; set[#set + 1] = 'R'
        set[#set + 1] = 'd' .. j; set[#set + 1] = string.format('%.3f', d)
        nxt[#nxt + 1] = {tonumber(j), v[nres + 2 * n]}
        if best == nil or d < best then best = d end
      end
      redis.call('HSET', h, unpack(set))
      redis.call('ZADD', idx, string.format('%.3f', best), f[7])
      return {'next', 'RUNNING', 'RUNNING', results, nxt}
    end
  end
end
""" + _LIB + r"""
-- the other cases: read with HMGET and written with one HSET where it can
local i = ARGV[4]
local f = redis.call('HMGET', h, 'state', 's' .. i, 'k' .. i, 'p' .. i,
                     'u' .. i, 'ns', 'id')
local st, s = f[1], f[2]
if not st then return {'missing'} end
if not s then return {'unknown-step', st, st} end
local k = tonumber(f[3] or '')
local g = k and redis.call('HMGET', h, 'g' .. k, 'w' .. k, 'g' .. (k + 1))
if not k or not g[1] or (g[2] and not tonumber(g[2])) or not f[4]
    or not f[5] then
  return damaged(i)
end

-- stage k is complete: finish the saga, or mark the next stage dispatched
-- (its leases start now) and hand it, with stage k's results, to the
-- caller to publish
local function next_stage()
  local nk = k + 1
  if nk >= tonumber(f[6]) then
    redis.call('HSET', h, 'dn' .. k, token)
    if st ~= 'COMPLETED' then finish('COMPLETED') end
    return {'completed', 'RUNNING', 'COMPLETED'}
  end
  if not g[3] then
    return redis.error_reply('CORRUPT stage ' .. nk .. ' of the saga record '
                             .. 'has no steps')
  end
  local want = {}
  for j in string.gmatch(g[1], '%d+') do want[#want + 1] = 'r' .. j end
  local results = many('HMGET', want)
  for n = 1, #want do results[n] = results[n] or 'null' end
  local steps = {}
  want = {'qt'}
  for j in string.gmatch(g[3], '%d+') do
    steps[#steps + 1] = j
    want[#want + 1] = 'c' .. j
    want[#want + 1] = 'p' .. j
  end
  local v = many('HMGET', want)
  local t, qt, best = clock(), tonumber(v[1]), nil
  local set = {'dn' .. k, token, 'cur', nk, 'w' .. nk, #steps}
  local held, nxt = {}, {}
  for n, j in ipairs(steps) do
    -- each may wait qt (+ its countdown) in the broker: see wait_lease
    local d = t + qt + tonumber(v[2 * n] or '0')
    set[#set + 1] = 's' .. j
    set[#set + 1] = 'R'
    set[#set + 1] = 'd' .. j
    set[#set + 1] = string.format('%.3f', d)
    held[#held + 1] = 'h' .. j
    nxt[#nxt + 1] = {tonumber(j), v[2 * n + 1]}
    if best == nil or d < best then best = d end
  end
  many('HSET', set)   -- field-value pairs: 1000 keeps them whole
  many('HDEL', held)
  -- a running saga has nothing else in flight: its deadline is this stage's
  redis.call('ZADD', idx, string.format('%.3f', best), f[7])
  return {'next', 'RUNNING', 'RUNNING', results, nxt}
end

if s == 'D' then
  if hget('tk' .. i) ~= token then return {'duplicate', st, st} end
  if hget('dn' .. k) == token and (st == 'RUNNING' or st == 'COMPLETED') then
    return next_stage()
  end
  return replay('replayed', st)
end
if s == 'P' and st == 'RUNNING' then
  -- a message for a step whose stage was never dispatched (stale or
  -- forged): recording it would dispatch the stage after it early
  return {'not-dispatched', st, st}
end
redis.call('HSET', h, 's' .. i, 'D', 'r' .. i, ARGV[5], 't' .. i, now,
           'tk' .. i, token)
local left = tonumber(g[2] or '0')
if s == 'R' then left = redis.call('HINCRBY', h, 'w' .. k, -1) end
if st == 'RUNNING' then
  if left > 0 then
    rescore()
    return {'recorded', st, st}
  end
  return next_stage()
end
-- A late completer: compensation began while this step was running, or
-- the step had been given up (lost, aborted) and ran after all.
local out = {}
local cur = num('cur')
if hget('u' .. i) ~= '0' then
  local x = hget('x' .. i) or ''
  if x == '' then
    if k == cur then
      open_stage(cur, out)
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
rescore()
return {'late', st, hget('state'), {}, {}, out}
"""

    #: Record that a forward step failed; the first failure of a running
    #: saga claims its compensation (exactly once, however many
    #: notifications arrive).
    #: ARGV[1-3] token, now, ttl; ARGV[4] step index, ARGV[5] reason.
    #: Returns {status, old state, new state, {}, {}, undos due}.
    STEP_FAILED = _LIB + r"""
local st = hget('state')
if not st then return {'missing'} end
local i = ARGV[4]
local s = hget('s' .. i)
if not s then return {'unknown-step', st, st} end
if s == 'D' then return {'completed-step', st, st} end
if s == 'F' then
  if hget('tk' .. i) ~= token then return {'duplicate', st, st} end
  return replay('replayed', st, 'claim', 'RUNNING')
end
local bad = damaged(i)
if bad then return bad end
local k = hget('k' .. i)
redis.call('HSET', h, 's' .. i, 'F', 'fe' .. i, ARGV[5], 't' .. i, now,
           'tk' .. i, token)
if s == 'R' then redis.call('HINCRBY', h, 'w' .. k, -1) end
local status = 'settled'
if st == 'RUNNING' then
  claim(i, ARGV[5])
  status = 'claimed'
end
local out = {}
if tonumber(k) == num('cur') then open_stage(k, out) end
advance(out)
rescore()
return {status, st, hget('state'), {}, {}, out}
"""

    #: An undo attempt is about to run: let one copy in and start its lease.
    #: ARGV[1-3] token, now, ttl; ARGV[4] step index, ARGV[5] attempt.
    #: Returns 'run', or why not: 'missing', 'done', 'not-due', 'stale',
    #: 'failed', 'running' (another copy of this attempt runs).
    UNDO_BEGIN = _LIB + r"""
if redis.call('EXISTS', h) == 0 then return 'missing' end
local i = ARGV[4]
local x = hget('x' .. i) or ''
if x == 'D' then return 'done' end
if x == '' then return 'not-due' end
if tonumber(ARGV[5]) ~= num('a' .. i) then return 'stale' end
if x == 'F' then return 'failed' end
if x == 'R' then
  if hget('tb' .. i) == token then return 'run' end
  return 'running'
end
redis.call('HSET', h, 'x' .. i, 'R', 'b' .. i, now, 'tb' .. i, token)
hold_lease(i, 'ou')
rescore()
return 'run'
"""

    #: An undo attempt stopped without an outcome because Celery retries
    #: it (``self.retry()``/``autoretry_for`` in the undo task): the retry
    #: comes as another copy of the same attempt and must be let in.
    #: ARGV[1-3] token, now, ttl; ARGV[4] step index, ARGV[5] token of the
    #: UNDO_BEGIN call that let this copy run.
    UNDO_RELEASE = _LIB + r"""
local i = ARGV[4]
if hget('x' .. i) == 'R' and hget('tb' .. i) == ARGV[5] then
  redis.call('HSET', h, 'x' .. i, 'Q')
  wait_lease(i, 0)
  rescore()
  return 1
end
return 0
"""

    #: An undo succeeded: record it and open the stage before when this
    #: one is settled.
    #: ARGV[1-3] token, now, ttl; ARGV[4] step index.
    #: Returns {status, old state, new state, {}, {}, undos due}.
    UNDO_DONE = _LIB + r"""
local st = hget('state')
if not st then return {'missing'} end
local i = ARGV[4]
local x = hget('x' .. i) or ''
if x == 'D' then
  if hget('tu' .. i) ~= token then return {'duplicate', st, st} end
  return replay('undone', st, 'fin', 'COMPENSATING')
end
if x == '' then return {'not-due', st, st} end
local bad = damaged(i)
if bad then return bad end
redis.call('HSET', h, 'x' .. i, 'D', 'z' .. i, now, 'tu' .. i, token)
if hget('l' .. i) == '1' then
  redis.call('HINCRBY', h, 'late', -1)
else
  redis.call('HINCRBY', h, 'y' .. hget('k' .. i), -1)
end
local out = {}
if hget('rd' .. i) == '1' then
  -- the step took effect after this undo had been sent: undo it again
  redis.call('HDEL', h, 'rd' .. i)
  late_undo(i, num('a' .. i) + 1, out)
end
advance(out)
rescore()
return {'undone', st, hget('state'), {}, {}, out}
"""

    #: An undo attempt failed (or was lost before it started): schedule the
    #: next attempt, or, when the budget is spent, mark the saga
    #: COMPENSATION_FAILED (its remaining undos wait for an operator).
    #: Each attempt is counted once, and a copy that never started (revoked,
    #: expired, unknown, unpublished) does not count while another copy of
    #: the attempt runs.
    #: ARGV[1-3] token, now, ttl; ARGV[4] step index, ARGV[5] attempt that
    #: failed, ARGV[6] error, ARGV[7] max attempts, ARGV[8] '1' if the
    #: failing copy had started, else '0', ARGV[9] seconds until the next
    #: attempt.
    #: Returns {status, old state, new state, {}, {}, {next attempt}}.
    UNDO_FAILED = _LIB + r"""
local st = hget('state')
if not st then return {'missing'} end
local i = ARGV[4]
local x = hget('x' .. i) or ''
local a = num('a' .. i)
if hget('tu' .. i) == token and (x == 'W' or x == 'F') then
  if x == 'W' then return {'retry', st, st, {}, {}, {describe(i, a)}} end
  local old = st
  if hget('cf') == token then old = 'COMPENSATING' end
  return {'failed', old, st}
end
if x == '' or x == 'D' or x == 'F' then return {'ignored', st, st} end
if tonumber(ARGV[5]) ~= a then return {'stale', st, st} end
if x == 'R' and ARGV[8] == '0' then return {'running', st, st} end
redis.call('HSET', h, 'e' .. i, ARGV[6], 'tu' .. i, token)
if a - num('ab' .. i) >= tonumber(ARGV[7]) then
  redis.call('HSET', h, 'x' .. i, 'F')
  if st ~= 'COMPENSATION_FAILED' then
    redis.call('HSET', h, 'state', 'COMPENSATION_FAILED', 'ended', now,
               'cf', token)
  end
  rescore()
  return {'failed', st, 'COMPENSATION_FAILED'}
end
redis.call('HSET', h, 'x' .. i, 'W', 'a' .. i, a + 1)
wait_lease(i, ARGV[9])
rescore()
return {'retry', st, st, {}, {}, {describe(i, a + 1)}}
"""

    #: A live worker still holds step i's forward task (ARGV[5] empty) or
    #: attempt ARGV[5] of its undo: extend the lease (never shorten it).
    #: ARGV[1-3] token, now, ttl (unused); ARGV[4] step index, ARGV[5]
    #: attempt or ''.
    #: Returns 1 if renewed, 0 if the step or attempt is no longer in flight.
    RENEW = _LIB + r"""
if redis.call('EXISTS', h) == 0 then return 0 end
local i = ARGV[4]
local field = 'o'
if ARGV[5] == '' then
  if hget('s' .. i) ~= 'R' then return 0 end
else
  if not inflight(hget('x' .. i) or '') or hget('a' .. i) ~= ARGV[5] then
    return 0
  end
  field = 'ou'
end
if hget('h' .. i) ~= '1' then
  -- a worker took it from the broker: from now on its lease is short
  hold_lease(i, field)
  rescore()
  return 1
end
local d = clock() + tonumber(hget(field .. i))
if d > tonumber(hget('d' .. i) or '0') then
  redis.call('HSET', h, 'd' .. i, string.format('%.3f', d))
  rescore()
end
return 1
"""

    #: The recovery sweep found the saga due: act on every lease that
    #: lapsed (checked again here, atomically).  A forward step nobody holds
    #: is given up (the saga compensates; its undo runs only if it opted in
    #: to compensate_on_failure, as the step may never have run); a queued
    #: or waiting undo is sent again (only one copy can begin); a running
    #: undo whose worker died counts as a failed attempt.  What is settled
    #: or still running elsewhere is left alone, so a stalled compensation
    #: resumes where it stopped.
    #: ARGV[1-3] token, now, ttl; ARGV[4] saga id, ARGV[5] max undo
    #: attempts.
    #: Returns {status, old state, new state, {}, {}, undos to publish,
    #: forward steps given up}.
    RECOVER = _LIB + r"""
if redis.call('EXISTS', h) == 0 then
  redis.call('ZREM', idx, ARGV[4])
  redis.call('ZREM', live, ARGV[4])
  redis.call('ZREM', KEYS[5], ARGV[4])
  return {'missing'}
end
local st = hget('state')
if st ~= 'RUNNING' and st ~= 'COMPENSATING' then
  rescore()
  return {'settled', st, st}
end
local t, out, lost = clock(), {}, {}
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
    if s == 'R' then
      local why = 'lost: its worker died (no lease renewal for ' ..
                  hget('o' .. i) .. 's)'
      if hget('h' .. i) ~= '1' then
        why = 'lost: no worker took it from the broker within ' ..
              hget('qt') .. 's'
      end
      redis.call('HSET', h, 's' .. i, 'F', 'fe' .. i, why, 't' .. i, now,
                 'tk' .. i, token)
      redis.call('HINCRBY', h, 'w' .. hget('k' .. i), -1)
      if hget('state') == 'RUNNING' then claim(i, why) end
      lost[#lost + 1] = tonumber(i)
    elseif x == 'Q' or x == 'W' then
      wait_lease(i, 0)
      out[#out + 1] = describe(i, num('a' .. i))
    elseif x == 'R' and hget('state') ~= 'COMPENSATION_FAILED' then
      local a = num('a' .. i)
      local why = 'lost: the worker running attempt ' .. a .. ' died'
      redis.call('HSET', h, 'e' .. i, why, 'tu' .. i, token)
      if a - num('ab' .. i) >= tonumber(ARGV[5]) then
        redis.call('HSET', h, 'x' .. i, 'F', 'state',
                   'COMPENSATION_FAILED', 'ended', now, 'cf', token)
      else
        redis.call('HSET', h, 'x' .. i, 'W', 'a' .. i, a + 1)
        wait_lease(i, 0)
        out[#out + 1] = describe(i, a + 1)
      end
    end
  end
end
if hget('state') == 'COMPENSATING' and cur >= 0 then open_stage(cur, out) end
advance(out)
local now_st = hget('state')
if (now_st == 'RUNNING' or now_st == 'COMPENSATING') and not earliest() then
  -- nothing in flight, yet not settled: a damaged record; the caller
  -- quarantines it rather than let it vanish from the index
  return {'stuck', st, now_st, {}, {}, out, lost}
end
rescore()
return {'recovered', st, now_st, {}, {}, out, lost}
"""

    #: An operator aborts a running saga: compensation is claimed and the
    #: caller revokes its in-flight forward steps (a step no worker holds
    #: yet is given up at once; a held one settles as it ends).
    #: ARGV[1-3] token, now, ttl; ARGV[4] reason.
    #: Returns {status ('aborted', 'not-running', 'missing'), old state,
    #: new state, {}, {}, undos due, steps to revoke}.
    ABORT = _LIB + r"""
local st = hget('state')
if not st then return {'missing'} end
local cur = num('cur')
-- the steps to revoke: those still running (a resent call gets them again)
local function running()
  local ids = {}
  for i in string.gmatch(hget('g' .. cur) or '', '%d+') do
    if hget('s' .. i) == 'R' then ids[#ids + 1] = tonumber(i) end
  end
  return ids
end
if st ~= 'RUNNING' then
  if hget('claim') == token then
    local r = replay('aborted', st, 'claim', 'RUNNING')
    r[7] = running()
    return r
  end
  return {'not-running', st, st}
end
local stopped = running()
for _, i in ipairs(stopped) do
  if hget('h' .. i) ~= '1' then
    -- still in the broker: it never started; give it up now (the revoke
    -- stops it; if it runs anyway it is undone as a late completer)
    redis.call('HSET', h, 's' .. i, 'F', 'fe' .. i, ARGV[4], 't' .. i, now,
               'tk' .. i, token)
    redis.call('HINCRBY', h, 'w' .. cur, -1)
  end
end
-- a step a worker holds stays running until its revoke (terminate) is
-- reported, it completes anyway (then it is undone first), or its lease
-- lapses: its undo must not run while its effect may still happen
claim(nil, ARGV[4])
local out = {}
open_stage(cur, out)
advance(out)
rescore()
return {'aborted', st, hget('state'), {}, {}, out, stopped}
"""

    #: One shard of the deadline index: the sagas whose earliest lease
    #: lapsed.  A long gap since the last sweep means Redis was unreachable
    #: (or no worker swept): then nothing is returned until ``hold``
    #: seconds have passed, so live workers renew their leases first.
    #: Also drops expired sagas from the listing index (at most ARGV[5]).
    #: KEYS[1] deadline index, KEYS[2] the shard's sweep record (it expires
    #: after ARGV[4] seconds: a missing one also means a gap), KEYS[3] all
    #: sagas, KEYS[4] expiry index; ARGV[1] limit, ARGV[2] gap, ARGV[3]
    #: hold, ARGV[4] record TTL, ARGV[5] most expired entries to drop.
    #: Returns {seconds still held (0 when sweeping), saga ids due}.
    SCAN = r"""
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf',
                        string.format('%.3f', now), 'LIMIT', 0, ARGV[5])
if #gone > 0 then
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('ZREM', KEYS[4], unpack(gone))
end
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or '')
local hold = tonumber(redis.call('HGET', KEYS[2], 'hold') or '0')
if last == nil or now - last > tonumber(ARGV[2]) then
  hold = now + tonumber(ARGV[3])
end
redis.call('HSET', KEYS[2], 'last', string.format('%.3f', now),
           'hold', string.format('%.3f', hold))
redis.call('EXPIRE', KEYS[2], ARGV[4])
if now < hold then return {string.format('%.3f', hold - now), {}} end
return {'0', redis.call('ZRANGEBYSCORE', KEYS[1], '-inf',
                        string.format('%.3f', now), 'LIMIT', 0, ARGV[1])}
"""

    #: An operator re-drives a COMPENSATION_FAILED saga: every undo that
    #: spent its attempts gets a new budget and is queued again (the next
    #: attempt number, so its task id is new); finished undos are never
    #: repeated.  What waited while the saga was COMPENSATION_FAILED is
    #: made due now: the undos of steps that completed late (in the stage
    #: under compensation, or out of order) and second undos (``rd<i>``).
    #: Undos still queued are sent again (only one copy of an attempt can
    #: begin).
    #: ARGV[1-3] token, now, ttl.
    #: Returns {status ('retried', 'wrong-state', 'missing'), old state,
    #: new state, {}, {}, undos due}.
    RETRY = _LIB + r"""
local st = hget('state')
if not st then return {'missing'} end
if hget('rt') == token then
  return replay('retried', st, 'rt', 'COMPENSATION_FAILED')
end
if st ~= 'COMPENSATION_FAILED' then return {'wrong-state', st, st} end
local n = num('n')
for i = 0, n - 1 do
  local bad = damaged(i)
  if bad then return bad end
end
redis.call('HSET', h, 'state', 'COMPENSATING', 'rt', token)
redis.call('HINCRBY', h, 'retries', 1)
redis.call('HDEL', h, 'ended')
for i = 0, n - 1 do
  if hget('x' .. i) == 'F' then
    local a = num('a' .. i)
    redis.call('HSET', h, 'x' .. i, 'Q', 'a' .. i, a + 1, 'ab' .. i, a)
    wait_lease(i, 0)
  end
end
local out = {}
queued(out)
for i = 0, n - 1 do
  local x = hget('x' .. i) or ''
  if hget('rd' .. i) == '1' and (x == '' or x == 'D') then
    redis.call('HDEL', h, 'rd' .. i)
    late_undo(i, num('a' .. i) + 1, out)
  end
end
local cur = num('cur')
if cur >= 0 then open_stage(cur, out) end
advance(out)
rescore()
return {'retried', st, hget('state'), {}, {}, out}
"""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = make_client(settings)
        register = self.client.register_script
        self._start = register(self.START)
        self._step_done = register(self.STEP_DONE)
        self._step_failed = register(self.STEP_FAILED)
        self._undo_begin = register(self.UNDO_BEGIN)
        self._undo_release = register(self.UNDO_RELEASE)
        self._undo_done = register(self.UNDO_DONE)
        self._undo_failed = register(self.UNDO_FAILED)
        self._renew = register(self.RENEW)
        self._recover = register(self.RECOVER)
        self._abort = register(self.ABORT)
        self._retry = register(self.RETRY)
        self._scan = register(self.SCAN)

    # -- keys -------------------------------------------------------------
    # A saga's hash and its shard's index share the hash tag ``{<shard>}``,
    # so every script touches one Redis Cluster slot, while the sagas
    # spread over SHARDS slots.

    def _tag(self, shard: int) -> str:
        return f'{self.settings.key_prefix}:{{{shard:02x}}}'

    def key(self, saga_id: str) -> str:
        """The saga's hash."""
        return f'{self._tag(shard_of(saga_id))}:saga:{saga_id}'

    def index_key(self, shard: int) -> str:
        """The deadline index of one shard: saga ids scored by the earliest
        lease of what they have in flight."""
        return f'{self._tag(shard)}:due'

    def sweep_key(self, shard: int) -> str:
        """When one shard was last swept, and until when it is held."""
        return f'{self._tag(shard)}:sweep'

    def live_key(self, shard: int) -> str:
        """Sagas of one shard not finished (running, compensating or
        waiting for an operator), scored by creation time."""
        return f'{self._tag(shard)}:live'

    def all_key(self, shard: int) -> str:
        """Every stored saga of one shard, scored by creation time."""
        return f'{self._tag(shard)}:sagas'

    def ends_key(self, shard: int) -> str:
        """Finished sagas of one shard, scored by when they expire."""
        return f'{self._tag(shard)}:ends'

    def quarantine_key(self, shard: int) -> str:
        """Sagas the sweep could not read (corrupt records), by time."""
        return f'{self._tag(shard)}:bad'

    def lock_key(self) -> str:
        """The lock held by the one worker that sweeps."""
        return f'{self.settings.key_prefix}:sweeper'

    def _keys(self, saga_id: str) -> list[str]:
        shard = shard_of(saga_id)
        return [self.key(saga_id), self.index_key(shard), self.live_key(shard),
                self.ends_key(shard), self.all_key(shard)]

    # -- writes ---------------------------------------------------------

    def create(self, saga_id: str, plan: Plan,
               specs: Sequence[str] | None = None) -> bool:
        """Store a new saga with its first stage marked dispatched.

        Arguments:
            specs: each step's spec already encoded as JSON (the canvas
                encodes them once, when it validates the saga).

        Returns:
            bool: ``False`` if a saga with this id already exists.
        Raises:
            SagaStoreUnavailable: Redis cannot be reached.
        """
        default = self.settings.step_timeout
        fields: list[Any] = [
            'state', SagaState.RUNNING.value, 'created', repr(time.time()),
            'qt', self.settings.queue_timeout,
            'n', len(plan), 'ns', len(plan.stages), 'cur', 0,
            'w0', len(plan.stages[0]),
        ]
        if specs is None:
            specs = [dumps(step.to_dict()) for step in plan.steps]
        for k, stage in enumerate(plan.stages):
            fields += ['g%d' % k, ','.join(str(s.index) for s in stage)]
            for step in stage:
                i = step.index
                fields += ['p%d' % i, specs[i], 'k%d' % i, k,
                           'u%d' % i, step.undo_flag,
                           's%d' % i, 'R' if k == 0 else 'P',
                           'o%d' % i, step.timeout or default,
                           'ou%d' % i, step.undo_timeout or default]
                if step.delay:
                    fields += ['c%d' % i, step.delay]
        return bool(self._run(self._start, keys=self._keys(saga_id),
                              args=[new_token(), saga_id, dumps(
                                  [str(f) for f in fields])]))

    def step_done(self, saga_id: str, index: int, result_json: str,
                  token: str | None = None) -> Outcome:
        """Record step ``index`` as completed with its result (one round
        trip) and return what must be dispatched next.  Resending with the
        same ``token`` is safe."""
        return self._decoded(saga_id, self._change(
            self._step_done, saga_id, token, index, result_json))

    def step_failed(self, saga_id: str, index: int, reason: str) -> Outcome:
        """Record step ``index`` as failed; claims compensation if the saga
        was running."""
        return self._decoded(saga_id, self._change(
            self._step_failed, saga_id, None, index, reason[:2000]))

    def undo_begin(self, saga_id: str, index: int, attempt: int,
                   token: str) -> str:
        """Let one copy of an undo attempt run; returns ``'run'`` or why
        not."""
        return self._change(self._undo_begin, saga_id, token, index, attempt)

    def undo_release(self, saga_id: str, index: int, begin_token: str) -> bool:
        """The copy let in by ``begin_token`` stops without an outcome
        (Celery retries it); let the retry in."""
        return bool(self._change(self._undo_release, saga_id, None, index,
                                 begin_token))

    def undo_done(self, saga_id: str, index: int,
                  token: str | None = None) -> Outcome:
        """Record step ``index`` as undone.  Resending with the same
        ``token`` is safe."""
        return self._decoded(saga_id, self._change(self._undo_done, saga_id, token,
                                          index))

    def undo_failed(self, saga_id: str, index: int, attempt: int,
                    error: str, started: bool = True,
                    countdown: float = 0.0) -> Outcome:
        """Count a failed undo attempt; the outcome holds the next attempt
        (status ``retry``) or the saga is COMPENSATION_FAILED (``failed``).

        Arguments:
            started: whether the failing copy had begun running; one that
                never started does not count while another copy runs.
            countdown: seconds until the next attempt is sent (its lease
                starts after them).
        """
        return self._decoded(saga_id, self._change(
            self._undo_failed, saga_id, None, index, attempt, error[:2000],
            self.settings.undo_max_attempts, '1' if started else '0',
            countdown))

    def renew(self, held: Iterable[tuple[str, int, int | None]]) -> int:
        """Extend the leases of the steps and undo attempts a live worker
        holds, in one round trip.

        Arguments:
            held: ``(saga id, step index, undo attempt or None)`` triples.
        Returns:
            int: how many were still in flight (and renewed).
        """
        pipe = self.client.pipeline(transaction=False)
        for saga_id, index, attempt in held:
            self._renew(keys=self._keys(saga_id), args=[
                '', 0, 0, index, '' if attempt is None else attempt],
                client=pipe)
        return sum(self._run(pipe.execute))

    def due(self, limit: int, gap: float, hold: float
            ) -> tuple[float, list[str], list[int]]:
        """Scan every shard of the deadline index (one round trip).

        Arguments:
            limit: at most this many sagas per shard.
            gap: seconds since a shard's last sweep after which its
                lapsed leases are not trusted (Redis was away).
            hold: how long such a shard is then left alone.
        Returns:
            tuple: the longest hold still running, the ids of the sagas
            due, and the shards that returned ``limit`` ids (more due).
        """
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            self._scan(keys=[self.index_key(shard), self.sweep_key(shard),
                             self.all_key(shard), self.ends_key(shard)],
                       args=[limit, gap, hold, math.ceil(2 * gap) + 1,
                             TRIM_LIMIT],
                       client=pipe)
        held, ids, full = 0.0, [], []
        for shard, (wait, due) in enumerate(self._run(pipe.execute)):
            held = max(held, float(wait))
            ids.extend(due)
            if len(due) >= limit:
                full.append(shard)
        return held, ids, full

    def recover(self, saga_id: str) -> Outcome:
        """Act on the lapsed leases of one saga (see :attr:`RECOVER`)."""
        return self._decoded(saga_id, self._change(
            self._recover, saga_id, None, saga_id,
            self.settings.undo_max_attempts))

    def quarantine(self, saga_id: str) -> None:
        """Take a saga the sweep cannot process out of the deadline index
        (into the shard's ``bad`` set, for an operator)."""
        shard = shard_of(saga_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.index_key(shard), saga_id)
        pipe.zadd(self.quarantine_key(shard), {saga_id: time.time()})
        self._run(pipe.execute)

    def abort(self, saga_id: str, reason: str,
              token: str | None = None) -> Outcome:
        """Stop a running saga: give up its in-flight steps and claim
        compensation (status ``aborted``, or ``not-running``/``missing``)."""
        return self._decoded(saga_id, self._change(self._abort, saga_id, token,
                                          reason[:2000]))

    def retry(self, saga_id: str, token: str | None = None) -> Outcome:
        """Re-drive a COMPENSATION_FAILED saga from the undos that failed
        (status ``retried``, or ``wrong-state``/``missing``, which change
        nothing)."""
        return self._decoded(saga_id, self._change(self._retry, saga_id,
                                                   token))

    # -- reads ----------------------------------------------------------

    def get_state(self, saga_id: str) -> SagaState:
        """Raises: SagaNotFound, SagaStoreUnavailable, CorruptSagaRecord."""
        value = self._run(self.client.hget, self.key(saga_id), 'state')
        if value is None:
            raise SagaNotFound(saga_id)
        try:
            return SagaState(value)
        except ValueError:
            raise CorruptSagaRecord(
                f'saga {saga_id!r} has an unknown state {value!r}') from None

    def step_status(self, saga_id: str, index: int) -> tuple[str | None, Any]:
        """Forward state code of step ``index`` and its recorded result
        (``(None, None)`` when the saga does not exist)."""
        step, result = self._run(self.client.hmget, self.key(saga_id),
                                 ['s%d' % index, 'r%d' % index])
        return step, loads(result) if result else None

    def read(self, saga_id: str) -> SagaRecord:
        """Decode the whole saga record.

        Raises:
            SagaNotFound: no such saga.
            CorruptSagaRecord: the record cannot be decoded.
        """
        try:
            raw = self._run(self.client.hgetall, self.key(saga_id))
        except CorruptSagaRecord as exc:
            raise CorruptSagaRecord(f'saga {saga_id!r}: {exc}') from exc
        if not raw:
            raise SagaNotFound(saga_id)
        try:
            return _decode_record(saga_id, raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptSagaRecord(
                f'saga {saga_id!r} has a corrupt record: {exc!r}') from exc

    def list_sagas(self, state: SagaState | None = None, limit: int = 50,
                   page: int = 100) -> list[Listed]:
        """The newest sagas first, read from the per-shard indexes (never
        ``KEYS``): the unfinished ones when ``state`` is RUNNING,
        COMPENSATING or COMPENSATION_FAILED, else every stored one.

        Arguments:
            state: only sagas in this state (read first, so only the
                records that match are read whole; a damaged record,
                listed as ``CORRUPT``, only shows without a state).
            limit: at most this many.
            page: ids read per shard and records per round trip.
        Raises:
            SagaStoreUnavailable: Redis cannot be reached.
        """
        live = state in (SagaState.RUNNING, SagaState.COMPENSATING,
                         SagaState.COMPENSATION_FAILED)
        keys = [self.live_key(s) if live else self.all_key(s)
                for s in range(SHARDS)]
        found: list[Listed] = []
        batch: list[tuple[str, float]] = []

        def flush() -> None:
            if state is not None:
                pipe = self.client.pipeline(transaction=False)
                for saga_id, _ in batch:
                    pipe.hget(self.key(saga_id), 'state')
                try:
                    states = self._run(pipe.execute, raise_on_error=False)
                except CorruptSagaRecord:   # not text: decided below
                    states = [state.value] * len(batch)
                batch[:] = [entry for entry, value in zip(
                    batch, states, strict=True) if value == state.value]
            pipe = self.client.pipeline(transaction=False)
            for saga_id, _ in batch:
                pipe.hgetall(self.key(saga_id))
            try:
                raws = self._run(pipe.execute, raise_on_error=False)
            except CorruptSagaRecord:
                # a record that is not UTF-8 text: find which, one by one
                raws = [self._hgetall_or_error(saga_id) for saga_id, _ in batch]
            for (saga_id, created), raw in zip(batch, raws, strict=True):
                entry = _listed(saga_id, created, raw)
                if entry is not None and (
                        state is None or entry.state == state.value):
                    found.append(entry)
            batch.clear()

        for saga_id, created in self._newest(keys, page):
            batch.append((saga_id, created))
            if len(batch) >= page:
                flush()
                if len(found) >= limit:
                    break
        if batch and len(found) < limit:
            flush()
        return found[:limit]

    def _newest(self, keys: list[str], page: int
                ) -> Iterator[tuple[str, float]]:
        """Merge sorted sets scored by time, newest first, each read a page
        at a time below the last score seen (the first page of all in one
        round trip), so sagas starting or finishing meanwhile shift
        nothing; each id is yielded once."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zrevrangebyscore(key, '+inf', '-inf', start=0, num=page,
                                  withscores=True)
        buffers = [deque(entries) for entries in self._run(pipe.execute)]
        more = [len(b) == page for b in buffers]
        seen: set[str] = set()
        heap = [(-b[0][1], b[0][0], n) for n, b in enumerate(buffers) if b]
        heapq.heapify(heap)
        while heap:
            score, saga_id, n = heapq.heappop(heap)
            buf = buffers[n]
            buf.popleft()
            if saga_id not in seen:
                seen.add(saga_id)
                yield saga_id, -score
            if not buf and more[n]:
                # from the last score on (ties included; ids seen skipped)
                entries = self._run(
                    self.client.zrevrangebyscore, keys[n], -score, '-inf',
                    start=0, num=page, withscores=True)
                fresh = [e for e in entries if e[0] not in seen]
                if not fresh and len(entries) == page:
                    # a whole page of one score: step past it
                    fresh = self._run(
                        self.client.zrevrangebyscore, keys[n], f'({-score}',
                        '-inf', start=0, num=page, withscores=True)
                    entries = fresh
                buf.extend(fresh)
                more[n] = len(entries) == page
            if buf:
                heapq.heappush(heap, (-buf[0][1], buf[0][0], n))

    def _hgetall_or_error(self, saga_id: str) -> Any:
        try:
            return self._run(self.client.hgetall, self.key(saga_id))
        except CorruptSagaRecord as exc:
            return exc

    # -- plumbing -------------------------------------------------------

    def _change(self, script: Any, saga_id: str, token: str | None,
                *args: Any) -> Any:
        """Run a script that changes a saga: token, now, ttl, then ``args``."""
        try:
            return self._run(script, keys=self._keys(saga_id), args=[
                token or new_token(), repr(time.time()),
                self.settings.result_expires, *args])
        except CorruptSagaRecord as exc:
            raise CorruptSagaRecord(f'saga {saga_id!r}: {exc}') from exc

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _TRANSIENT as exc:
            raise SagaStoreUnavailable(
                f'saga store at {self.settings.safe_redis_url} is '
                f'unreachable: {exc}') from exc
        except redis.ResponseError as exc:
            if str(exc).startswith('CORRUPT'):
                raise CorruptSagaRecord(str(exc)[len('CORRUPT '):]) from exc
            if str(exc).rpartition('caused error: ')[2].startswith(
                    _TRANSIENT_REPLIES):
                raise SagaStoreUnavailable(
                    f'saga store at {self.settings.safe_redis_url} is '
                    f'unreachable: {exc}') from exc
            raise SagaStoreError(
                f'saga store at {self.settings.safe_redis_url} failed: '
                f'{exc}') from exc
        except redis.RedisError as exc:
            raise SagaStoreError(
                f'saga store at {self.settings.safe_redis_url} failed: '
                f'{exc}') from exc
        except UnicodeDecodeError as exc:
            # records hold JSON text only; never decoded any other way
            raise CorruptSagaRecord(
                'a saga record holds bytes that are not UTF-8 text (records '
                f'are JSON): {exc}') from exc

    def _decoded(self, saga_id: str, reply: list[Any]) -> Outcome:
        try:
            return self._outcome(reply)
        except CorruptSagaRecord as exc:
            raise CorruptSagaRecord(f'saga {saga_id!r}: {exc}') from exc

    @staticmethod
    def _outcome(reply: list[Any]) -> Outcome:
        """Decode a script's reply.

        Raises:
            CorruptSagaRecord: a spec or result in the record is not valid
                JSON (what the script changed stays changed, and the sweep
                quarantines the saga).
        """
        status = reply[0]
        if len(reply) < 3:
            return Outcome(status)
        try:
            results = [loads(r) for r in reply[3]] if len(reply) > 3 else []
            forward = ([StepSpec.from_dict(loads(spec)) for _, spec in reply[4]]
                       if len(reply) > 4 else [])
            undos = []
            for _, spec, result, prev, attempt in (reply[5] if len(reply) > 5
                                                   else ()):
                undos.append(UndoDue(StepSpec.from_dict(loads(spec)),
                                     loads(result), [loads(r) for r in prev],
                                     int(attempt)))
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptSagaRecord(
                f'a saga record holds a step that cannot be decoded: {exc!r}'
            ) from exc
        stopped = [int(i) for i in reply[6]] if len(reply) > 6 else []
        return Outcome(status, _state(reply[1]), _state(reply[2]), results,
                       forward, undos, stopped)


#: Errors after which the same call may succeed: connection trouble (also
#: no Sentinel knowing the primary, no cluster node answering), a replica
#: promoted (READONLY), a full Redis (OOM under noeviction), a cluster
#: resharding (TRYAGAIN) or failing over (CLUSTERDOWN, MASTERDOWN, too
#: many redirections), a Redis loading its data.
_TRANSIENT = tuple(cls for cls in (
    redis.ConnectionError, redis.TimeoutError,
    getattr(redis.exceptions, 'ReadOnlyError', None),
    getattr(redis.exceptions, 'OutOfMemoryError', None),
    getattr(redis.exceptions, 'TryAgainError', None),
    getattr(redis.exceptions, 'BusyLoadingError', None),
    getattr(redis.exceptions, 'ClusterError', None),
    getattr(redis.exceptions, 'SlotNotCoveredError', None),
) if cls is not None)

#: Error replies (without a redis-py class) after which the same call may
#: succeed: a primary with ``min-replicas-to-write`` that lost its replicas,
#: e.g. a former primary after a Sentinel failover, until it is demoted.
_TRANSIENT_REPLIES = ('NOREPLICAS',)

#: Expired sagas each sweep drops from one shard's listing index: with 64
#: shards and the default 10 s interval, 6,400 sagas finishing a second.
TRIM_LIMIT = 1000

#: Shards of the deadline index.  Fixed: a saga's keys are found from its
#: id through it.
SHARDS = 64


def shard_of(saga_id: str) -> int:
    """The shard (hash tag) of a saga: stable across processes."""
    return zlib.crc32(saga_id.encode()) % SHARDS


def new_token() -> str:
    """A token identifying one call (and its resends) to a script."""
    return uuid.uuid4().hex


def make_client(settings: Settings) -> Any:
    """A client for the saga store, retrying briefly on connection errors:
    a :class:`redis.Redis` for one server or the primary behind Sentinels
    (following a failover), a :class:`~.clients.LazyRedisCluster` for a
    Redis Cluster."""
    return connect(settings.redis_url, settings.redis_transport_options,
                   settings.redis_socket_timeout)


def _listed(saga_id: str, created: float, raw: Any) -> Listed | None:
    """Decode one record for a listing (``None``: it has expired)."""
    if isinstance(raw, Exception):
        return Listed(saga_id, created, None, str(raw))
    if not raw:
        return None
    try:
        return Listed(saga_id, created, _decode_record(saga_id, raw))
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        return Listed(saga_id, created, None, repr(exc))


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _decode_record(saga_id: str, raw: dict[str, str]) -> SagaRecord:
    created = float(raw['created'])
    specs = [StepSpec.from_dict(loads(raw['p%d' % i]))
             for i in range(int(raw['n']))]
    # a stage is dispatched when the one before it completes: its last
    # member's settle time
    settled = [_float(raw.get('t%d' % i)) for i in range(len(specs))]
    starts: dict[int, float | None] = {0: created}
    for spec in specs:
        if spec.stage > 0 and spec.stage not in starts:
            before = [settled[s.index] for s in specs
                      if s.stage == spec.stage - 1]
            times = [t for t in before if t is not None]
            starts[spec.stage] = (max(times) if times
                                  and len(times) == len(before) else None)
    steps = []
    for i, spec in enumerate(specs):
        state = StepState(raw['s%d' % i])
        attempts = int(raw.get('a%d' % i, 0))
        steps.append(StepRecord(
            index=i, stage=spec.stage, task_name=spec.call.name,
            task_id=step_task_id(saga_id, i),
            undo_name=spec.undo.name if spec.undo else None,
            state=state,
            result=loads(raw['r%d' % i]) if 'r%d' % i in raw else None,
            started_at=(None if state is StepState.PENDING
                        else starts.get(spec.stage)),
            settled_at=settled[i],
            failure=raw.get('fe%d' % i),
            undo_state=UndoState(raw.get('x%d' % i, '')),
            undo_attempts=attempts,
            undo_task_id=(undo_task_id(saga_id, i, attempts) if attempts
                          else None),
            undo_started_at=_float(raw.get('b%d' % i)),
            undo_error=raw.get('e%d' % i),
            undone_at=_float(raw.get('z%d' % i)),
        ))
    failed = raw.get('failed')
    return SagaRecord(
        saga_id=saga_id, state=SagaState(raw['state']),
        created=created, ended=_float(raw.get('ended')),
        failed_step=int(failed) if failed else None,
        reason=raw.get('reason'), steps=steps,
        retries=int(raw.get('retries', 0)),
    )
