"""Every store command, table-driven, against a real Redis.

Each case seeds a saga record (created by ``start`` from one small plan,
then set field by field through :mod:`celery_compensate.store.layout`),
applies one command through :class:`~celery_compensate.store.SagaStore`
and checks the reply, the saga state before and after, every field the
command changed (a field it changes that the case does not name fails the
case) and the shard's index entries.  docs/state-machine.md cites these
cases by id (``<command>:<saga state>:<what>``).

The plan: stage 0 ``a`` (step 0), stage 1 ``b1``, ``b2`` in parallel
(steps 1, 2), stage 2 ``c`` (step 3); every step has an undo unless a case
says otherwise; step leases 60 s, undo leases 90 s, queue timeout 1800 s.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from celery_compensate import CorruptSagaRecord, SagaState
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef, UndoSpec
from celery_compensate.store import Outcome, Reply, SagaStore
from celery_compensate.store import layout as L

SID = 'cmd'
QT = 1800.0          #: the default compensate_queue_timeout
LEASE = 60.0         #: every step's compensate_timeout
UNDO_LEASE = 90.0    #: every undo's
FAR = '9999999999.000'      #: a lease that will not lapse
LAPSED = '1.000'            #: a lease that lapsed long ago
MAX = 6                     #: the default compensate_undo_max_attempts
HEARTBEAT = 10.0            #: the default compensate_heartbeat_interval

RUNNING, COMPLETED = SagaState.RUNNING, SagaState.COMPLETED
COMPENSATING, COMPENSATED = SagaState.COMPENSATING, SagaState.COMPENSATED
CF = SagaState.COMPENSATION_FAILED


# -- expectations ---------------------------------------------------------

class _Absent:
    def __repr__(self) -> str:
        return 'ABSENT'


class _Present:
    def __repr__(self) -> str:
        return 'PRESENT'


ABSENT, PRESENT = _Absent(), _Present()


@dataclass(frozen=True)
class About:
    """A timestamp ``seconds`` after the Redis clock at the call (±2 s)."""

    seconds: float


@dataclass(frozen=True)
class Has:
    """A text containing ``part``."""

    part: str


def matches(expected: Any, value: Any, now: float) -> bool:
    if expected is ABSENT:
        return value is None
    if expected is PRESENT:
        return value is not None
    if isinstance(expected, About):
        return value is not None and abs(
            float(value) - (now + expected.seconds)) <= 2.0
    if isinstance(expected, Has):
        return value is not None and expected.part in value
    return value == str(expected)


# -- seeding --------------------------------------------------------------

_STEP = {'s': L.step_state, 'r': L.result, 't': L.settled_at,
         'fe': L.failure, 'x': L.undo_state, 'a': L.attempt,
         'ab': L.attempts_before, 'h': L.held, 'd': L.deadline, 'l': L.late,
         'rd': L.redo, 'tk': L.settle_token, 'tb': L.begin_token,
         'tu': L.undo_token, 'e': L.undo_error, 'b': L.undo_started,
         'z': L.undone_at, 'u': L.undo_flag, 'k': L.stage, 'p': L.spec,
         'o': L.lease, 'ou': L.undo_lease, 'ob': L.outbox,
         'pg': L.generation}
_STAGE = {'w': L.waiting, 'y': L.undos_left, 'g': L.members,
          'dn': L.stage_token, 'pb': L.publisher}
_SAGA = {'state': L.STATE, 'cur': L.CUR, 'late': L.LATE,
         'reason': L.REASON, 'failed': L.FAILED, 'claim': L.CLAIM,
         'cf': L.CF, 'ended': L.ENDED, 'fin': L.FIN, 'rt': L.RT,
         'retries': L.RETRIES, 'cstart': L.CSTART, 'n': L.N}
#: pseudo-fields of a seed: the saga's entries in its shard's indexes
#: (a score, ``None`` to remove; ``True``/``False`` for :live/:ends) and
#: its TTL
DUE, LIVE, ENDS, TTL = ':due', ':live', ':ends', ':ttl'


def step(i: int, **kw: Any) -> dict[str, Any]:
    """Fields of step ``i`` by short name (``s``, ``x``, ``a`` ...)."""
    return {_STEP[k](i): v for k, v in kw.items()}


def stage(k: int, **kw: Any) -> dict[str, Any]:
    """Fields of stage ``k`` by short name (``w``, ``y``, ``g``, ``dn``)."""
    return {_STAGE[n](k): v for n, v in kw.items()}


def saga(**kw: Any) -> dict[str, Any]:
    """Saga fields by short name."""
    return {_SAGA[k]: v for k, v in kw.items()}


def seed(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        out.update(part)
    return out


def done(*steps: int) -> dict[str, Any]:
    return seed(*[step(i, s='D', r=f'"r{i}"', t='1', tk=f'tk{i}')
                  for i in steps])


def at_stage1(held: tuple[int, ...] = (), recorded: tuple[int, ...] = ()
              ) -> dict[str, Any]:
    """RUNNING: ``a`` done, ``b1``/``b2`` dispatched (queued unless held;
    ``recorded`` ones done)."""
    members = seed(*[step(i, s='R', d=FAR, **({'h': 1} if i in held else {}))
                     for i in (1, 2) if i not in recorded])
    return seed(saga(cur=1), done(0, *recorded), stage(0, w=0), members,
                stage(1, w=2 - len(recorded)), {DUE: FAR})


def at_stage2() -> dict[str, Any]:
    """RUNNING: ``c`` dispatched, everything before done."""
    return seed(saga(cur=2), done(0, 1, 2), stage(0, w=0), stage(1, w=0),
                step(3, s='R', d=FAR), stage(2, w=1), {DUE: FAR})


def claimed(failed: int, reason: str = 'boom') -> dict[str, Any]:
    return seed(saga(state='COMPENSATING', reason=reason, failed=failed,
                     claim='tok-claim', cstart='1'),
                step(failed, s='F', fe=reason, t='1', tk='tok-claim'))


def b2_failed() -> dict[str, Any]:
    """COMPENSATING: ``b2`` failed while ``b1`` still runs (stage 1 is
    ``cur``)."""
    return seed(at_stage1(), claimed(2), stage(1, w=1))


def c_failed() -> dict[str, Any]:
    """COMPENSATING: ``c`` failed; the undos of ``b1`` and ``b2`` are
    queued (stage 1 is ``cur``)."""
    return seed(at_stage2(), claimed(3), stage(2, w=0), saga(cur=1),
                step(1, x='Q', a=1, d=FAR), step(2, x='Q', a=1, d=FAR),
                stage(1, y=2))


def undoing_a() -> dict[str, Any]:
    """COMPENSATING: stage 1 settled without ``b1`` (given up as lost) and
    ``b2`` (failed); the undo of ``a`` runs (stage 0 is ``cur``)."""
    return seed(at_stage1(), claimed(2),
                step(1, s='F', fe='lost: test', t='1', tk='tk1'),
                stage(1, w=0), saga(cur=0),
                step(0, x='R', a=1, d=FAR, h=1, tb='tb0', b='1'),
                stage(0, y=1))


def compensated() -> dict[str, Any]:
    """COMPENSATED: ``b1`` given up, ``b2`` failed, ``a`` undone."""
    return seed(undoing_a(), saga(state='COMPENSATED', cur=-1, ended='2',
                                  fin='tok-fin'),
                step(0, x='D', z='2', tu='tu0', h=None), stage(0, y=0),
                {DUE: None, LIVE: False, ENDS: True, TTL: 600})


def completed() -> dict[str, Any]:
    return seed(at_stage2(), done(3), stage(2, w=0, dn='tok-dn'),
                saga(state='COMPLETED', ended='2', fin='tok-fin'),
                {DUE: None, LIVE: False, ENDS: True, TTL: 600})


def cf_stage1() -> dict[str, Any]:
    """COMPENSATION_FAILED: after ``c`` failed, ``b2`` was undone and
    ``b1``'s undo spent its budget."""
    return seed(c_failed(), step(1, x='F', a=MAX, e='RuntimeError: e',
                                 tu='tu1'),
                step(2, x='D', z='2', tu='tu2'), stage(1, y=1),
                saga(state='COMPENSATION_FAILED', ended='2', cf='tok-cf'),
                {DUE: None})


def cf_stage1_running_b1() -> dict[str, Any]:
    """COMPENSATION_FAILED in stage 1 while ``b1`` still runs: ``b2``
    (``compensate_on_failure``) failed and its undo spent its budget."""
    return seed(b2_failed(), step(2, x='F', a=MAX, e='RuntimeError: e',
                                  tu='tu2'),
                stage(1, y=1),
                saga(state='COMPENSATION_FAILED', ended='2', cf='tok-cf'),
                {DUE: None})


def cf_stage0() -> dict[str, Any]:
    """COMPENSATION_FAILED in stage 0: ``a``'s undo spent its budget after
    stage 1 settled without ``b1`` (given up)."""
    return seed(undoing_a(), step(0, x='F', a=MAX, e='RuntimeError: e',
                                  tu='tu0', h=None),
                saga(state='COMPENSATION_FAILED', ended='2', cf='tok-cf'),
                {DUE: None})


# -- the cases ------------------------------------------------------------

#: the saga state is whatever it was
SAME = object()


@dataclass
class Case:
    id: str
    call: Callable[[SagaStore, str], Any]
    reply: Reply | None
    seed: dict[str, Any] = field(default_factory=dict)
    old: Any = SAME
    new: Any = SAME
    #: every field the command may change, with its value afterwards
    fields: dict[str, Any] = field(default_factory=dict)
    due: Any = None          #: True/False/About: the saga's :due entry
    live: bool | None = None
    ends: bool | None = None
    sagas: bool | None = None
    expires: bool | None = None      #: whether the record has a TTL
    undos: list[tuple[int, int]] | None = None   #: (step, attempt) due
    forward: list[int] | None = None
    results: list[Any] | None = None
    stopped: list[int] | None = None
    undo_flags: dict[int, int] = field(default_factory=dict)
    exists: bool = True      #: whether the saga exists before the call
    raises: type[Exception] | None = None
    #: the same token for every call (a resent call: its reply was lost)
    fixed_token: bool = False

    def __repr__(self) -> str:
        return self.id


def param(case: Case) -> Any:
    return pytest.param(case, id=case.id)


def twice(fn: Callable[[SagaStore, str], Any]
          ) -> Callable[[SagaStore, str], Any]:
    """Call ``fn`` twice (with :attr:`Case.fixed_token`: a resend) and
    return the second answer."""
    def call(store: SagaStore, sid: str) -> Any:
        fn(store, sid)
        return fn(store, sid)
    return call


def plan(undo_flags: dict[int, int]) -> Plan:
    """The plan; ``undo_flags[i]``: 0 no undo, 2 compensate_on_failure."""
    stages, i = [], 0
    for names in (['a'], ['b1', 'b2'], ['c']):
        members = []
        for name in names:
            flag = undo_flags.get(i, 1)
            members.append((TaskRef(f't.{name}'),
                            None if flag == 0 else UndoSpec('t.undo'),
                            flag == 2, LEASE, UNDO_LEASE, 0.0))
            i += 1
        stages.append(members)
    return Plan.from_stages(stages)



def _spy(store: SagaStore, case: Case,
         monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every reply as the command sent it, before the store decodes it;
    with ``case.fixed_token`` every call gets the same token (a resend)."""
    if case.fixed_token:
        monkeypatch.setattr(sys.modules[SagaStore.__module__], 'new_token',
                            lambda: 'tok-resent')
    raw: list[Any] = []
    original = store._run

    def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        reply = original(fn, *args, **kwargs)
        raw.append(reply)
        return reply

    monkeypatch.setattr(store, '_run', spy)
    return raw

def run_case(case: Case, celery_app: Any, rds: Any,
             monkeypatch: pytest.MonkeyPatch) -> Any:
    store = get_state(celery_app).store
    keys = store.keys
    shard = L.shard_of(SID)
    key = keys.saga(SID)
    if case.exists:
        assert store.create(SID, plan(case.undo_flags))
        values = case.seed
        fields = {f: v for f, v in values.items() if not f.startswith(':')}
        gone = [f for f, v in fields.items() if v is None]
        if gone:
            rds.hdel(key, *gone)
        kept = {f: v for f, v in fields.items() if v is not None}
        if kept:
            rds.hset(key, mapping=kept)
        if DUE in values:
            if values[DUE] is None:
                rds.zrem(keys.due(shard), SID)
            else:
                rds.zadd(keys.due(shard), {SID: values[DUE]})
        if LIVE in values:
            if values[LIVE]:
                rds.zadd(keys.live(shard), {SID: 1})
            else:
                rds.zrem(keys.live(shard), SID)
        if ENDS in values:
            if values[ENDS]:
                rds.zadd(keys.ends(shard), {SID: 9999999999})
            else:
                rds.zrem(keys.ends(shard), SID)
        if values.get(TTL):
            rds.expire(key, values[TTL])
    elif case.seed.get(ENDS):
        rds.zadd(keys.ends(shard), {SID: 1})     # an expired earlier saga
    raw = _spy(store, case, monkeypatch)
    before = rds.hgetall(key)
    sec, usec = rds.time()
    now = sec + usec / 1e6
    if case.raises:
        with pytest.raises(case.raises):
            case.call(store, SID)
        result = None
    else:
        result = case.call(store, SID)
        status = raw[-1] if isinstance(raw[-1], str) else raw[-1][0]
        assert Reply(status) is case.reply, (status, case.reply)
    after = rds.hgetall(key)

    # fields: the named ones have their value, no other one changed
    for name, expected in case.fields.items():
        assert matches(expected, after.get(name), now), (
            name, after.get(name), expected)
    changed = {f for f in set(before) | set(after)
               if before.get(f) != after.get(f)}
    assert changed <= set(case.fields), (
        f'changed but not expected: '
        f'{ {f: (before.get(f), after.get(f)) for f in changed - set(case.fields)} }')
    if L.STATE not in case.fields and case.exists and not case.raises:
        assert after.get(L.STATE) == before.get(L.STATE)

    # the shard's indexes
    def entry(index_key: str) -> float | None:
        return rds.zscore(index_key, SID)

    if case.due is not None:
        score = entry(keys.due(shard))
        if isinstance(case.due, About):
            assert matches(case.due, score, now), ('due', score, case.due)
        elif isinstance(case.due, float):
            assert score == case.due, ('due', score, case.due)
        else:
            assert (score is not None) is case.due, ('due', score)
    for name, want in (('live', case.live), ('ends', case.ends),
                       ('sagas', case.sagas)):
        if want is not None:
            score = entry(getattr(keys, name)(shard))
            assert (score is not None) is want, (name, score)
    if case.expires is not None:
        assert (rds.ttl(key) > 0) is case.expires, rds.ttl(key)

    # the decoded outcome
    if isinstance(result, Outcome):
        assert result.status is case.reply
        if case.old is not SAME:
            assert result.old_state is case.old, result.old_state
        if case.new is not SAME:
            assert result.new_state is case.new, result.new_state
        if case.undos is not None:
            assert [(d.step.index, d.attempt) for d in result.undos] == \
                case.undos
        else:
            assert result.undos == []
        if case.forward is not None:
            assert [s.index for s in result.forward] == case.forward
        else:
            assert result.forward == []
        if case.results is not None:
            assert result.results == case.results
        if case.stopped is not None:
            assert result.stopped == case.stopped
    return result


def done_call(i: int, result: str = '"ok"', token: str | None = None):
    return lambda store, sid: store.step_done(sid, i, result, token)


def failed_call(i: int, reason: str = 'boom'):
    return lambda store, sid: store.step_failed(sid, i, reason)


# -- step_done ------------------------------------------------------------

STEP_DONE = [
    Case('step_done:running:last-of-stage', done_call(0, '"ra"'), Reply.NEXT,
         old=RUNNING, new=RUNNING,
         fields={**step(0, s='D', r='"ra"', t=PRESENT, tk=PRESENT),
                 **stage(0, w=0, dn=PRESENT), **saga(cur=1),
                 **stage(1, w=2, pb=0),
                 **step(1, s='R', d=About(LEASE), h=ABSENT, ob=1),
                 **step(2, s='R', d=About(LEASE), ob=1)},
         forward=[1, 2], results=['ra'], due=About(LEASE), live=True,
         ends=False),
    Case('step_done:running:member-recorded', done_call(1, '"r1"'),
         Reply.RECORDED, seed=at_stage1(), old=RUNNING, new=RUNNING,
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT),
                 **stage(1, w=1), **step(2, s='R'), **saga(cur=1)},
         due=True),
    Case('step_done:running:last-step', done_call(3, '"rc"'),
         Reply.COMPLETED, seed=at_stage2(), old=RUNNING, new=COMPLETED,
         fields={**step(3, s='D', r='"rc"', t=PRESENT, tk=PRESENT),
                 **stage(2, w=0, dn=PRESENT),
                 **saga(state='COMPLETED', ended=PRESENT, fin=PRESENT)},
         due=False, live=False, ends=True, expires=True),
    Case('step_done:running:duplicate', done_call(0, '"ra"'),
         Reply.DUPLICATE, seed=at_stage1(), old=RUNNING, new=RUNNING,
         fields={**step(0, s='D', tk='tk0'), **saga(cur=1)}, due=True),
    Case('step_done:running:resent-next', twice(done_call(0, '"ra"', 'tk')),
         Reply.NEXT, old=RUNNING, new=RUNNING,
         fields={**step(0, s='D', r='"ra"', t=PRESENT, tk='tk'),
                 **stage(0, w=0, dn='tk'), **saga(cur=1),
                 **stage(1, w=2, pb=0), **step(1, s='R', d=About(LEASE), ob=1),
                 **step(2, s='R', d=About(LEASE), ob=1)},
         forward=[1, 2], results=['ra'], due=About(LEASE)),
    Case('step_done:completed:resent', twice(done_call(3, '"rc"', 'tk')),
         Reply.COMPLETED, seed=at_stage2(), old=RUNNING, new=COMPLETED,
         fields={**step(3, s='D', r='"rc"', t=PRESENT, tk='tk'),
                 **stage(2, w=0, dn='tk'),
                 **saga(state='COMPLETED', ended=PRESENT, fin='tk')},
         due=False, live=False, ends=True),
    Case('step_done:completed:duplicate', done_call(3, '"rc"'),
         Reply.DUPLICATE, seed=completed(), old=COMPLETED, new=COMPLETED,
         fields=saga(state='COMPLETED'), due=False, ends=True),
    Case('step_done:compensating:replayed',
         done_call(1, '"r1"', 'tok-b1'), Reply.REPLAYED,
         seed=seed(b2_failed(), done(1), step(1, tk='tok-b1', x='Q', a=1),
                   stage(1, w=0, y=1)),
         old=COMPENSATING, new=COMPENSATING, undos=[(1, 1)],
         fields=step(1, s='D', x='Q')),
    Case('step_done:running:not-dispatched', done_call(3, '"x"'),
         Reply.NOT_DISPATCHED, old=RUNNING, new=RUNNING,
         fields=step(3, s='P')),
    Case('step_done:missing', done_call(0), Reply.MISSING, exists=False,
         old=None, new=None),
    Case('step_done:running:unknown-step', done_call(9), Reply.UNKNOWN_STEP,
         old=RUNNING, new=RUNNING),
    Case('step_done:running:corrupt', done_call(0), None,
         seed={L.stage(0): None}, raises=CorruptSagaRecord,
         fields=step(0, s='R')),
    Case('step_done:compensating:late-current-stage', done_call(1, '"r1"'),
         Reply.LATE, seed=b2_failed(), old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x='Q',
                        a=1, d=About(UNDO_LEASE)),
                 **stage(1, w=0, y=1), **saga(cur=1)},
         undos=[(1, 1)], due=About(UNDO_LEASE)),
    Case('step_done:compensating:late-settled-stage', done_call(1, '"r1"'),
         Reply.LATE, seed=undoing_a(), old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x='Q',
                        a=1, ab=0, l=1, d=About(UNDO_LEASE)),
                 **saga(late=1, cur=0), **step(0, x='R')},
         undos=[(1, 1)], due=True),
    Case('step_done:compensated:late-reopens', done_call(1, '"r1"'),
         Reply.LATE, seed=compensated(), old=COMPENSATED, new=COMPENSATING,
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x='Q',
                        a=1, ab=0, l=1, d=About(UNDO_LEASE)),
                 **saga(state='COMPENSATING', late=1, ended='2', fin='tok-fin')},
         undos=[(1, 1)], due=About(UNDO_LEASE), live=True, ends=False,
         expires=False),
    Case('step_done:compensated:late-no-undo', done_call(1, '"r1"'),
         Reply.LATE, seed=compensated(), undo_flags={1: 0},
         old=COMPENSATED, new=COMPENSATED,
         fields=step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x=ABSENT),
         due=False, live=False, ends=True, expires=True),
    Case('step_done:compensating:late-no-undo', done_call(1, '"r1"'),
         Reply.LATE, seed=b2_failed(), undo_flags={1: 0},
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x=ABSENT),
                 **stage(1, w=0), **saga(cur=0),
                 **step(0, x='Q', a=1, d=About(UNDO_LEASE), h=ABSENT),
                 **stage(0, y=1)},
         undos=[(0, 1)]),
    Case('step_done:compensating:late-after-cof-undo-done',
         done_call(1, '"r1"'), Reply.LATE, undo_flags={1: 2},
         seed=seed(at_stage1(), claimed(1, 'lost: test'),
                   step(1, x='D', a=1, z='2', tu='tu1'), stage(1, w=1, y=0)),
         old=COMPENSATING, new=COMPENSATING,
         # its stage is still compensated: the second undo holds it, so
         # the stage before waits for it
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x='Q',
                        a=2, ab=1, l=ABSENT, d=About(UNDO_LEASE)),
                 **saga(late=ABSENT, cur=1), **stage(1, y=1)},
         undos=[(1, 2)]),
    Case('step_done:compensating:late-while-cof-undo-runs',
         done_call(1, '"r1"'), Reply.LATE, undo_flags={1: 2},
         seed=seed(at_stage1(), claimed(1, 'lost: test'),
                   step(2, s='F', fe='boom', t='1', tk='tk2'),
                   step(1, x='R', a=1, d=FAR, h=1, tb='tb1'),
                   stage(1, w=0, y=1)),
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x='R',
                        rd=1)},
         undos=[]),
    Case('step_done:compensation_failed:late-current-stage',
         done_call(1, '"r1"'), Reply.LATE, undo_flags={2: 2},
         seed=cf_stage1_running_b1(), old=CF, new=CF,
         fields={**step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x=ABSENT),
                 **stage(1, w=0), **saga(cur=1)},
         undos=[], due=False, live=True),
    Case('step_done:compensation_failed:late-settled-stage',
         done_call(1, '"r1"'), Reply.LATE, seed=cf_stage0(), old=CF, new=CF,
         fields=step(1, s='D', r='"r1"', t=PRESENT, tk=PRESENT, x=ABSENT,
                     rd=1),
         undos=[], due=False),
    Case('step_done:compensating:undispatched-step', done_call(3, '"rc"'),
         Reply.LATE, seed=b2_failed(), old=COMPENSATING, new=COMPENSATING,
         fields={**step(3, s='D', r='"rc"', t=PRESENT, tk=PRESENT, x='Q',
                        a=1, ab=0, l=1, d=About(UNDO_LEASE)),
                 **saga(late=1), **stage(2, w=ABSENT)},
         undos=[(3, 1)]),
]


@pytest.mark.parametrize('case', [param(c) for c in STEP_DONE])
def test_step_done(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


# -- step_failed ----------------------------------------------------------

def failed_unstored(i: int):
    return lambda store, sid: store.step_failed(
        sid, i, 'ResultTooLarge: too big',
        '{"compensate_result_unstored": "ResultTooLarge: too big"}')


STEP_FAILED = [
    Case('step_failed:running:result-not-stored-is-undone',
         failed_unstored(1), Reply.CLAIMED, seed=at_stage1(held=(1,)),
         old=RUNNING, new=COMPENSATING,
         fields={**step(1, s='F', fe='ResultTooLarge: too big', t=PRESENT,
                        tk=PRESENT, u=2, x='Q', a=1, d=About(UNDO_LEASE),
                        h=ABSENT,
                        r='{"compensate_result_unstored": '
                          '"ResultTooLarge: too big"}'),
                 **stage(1, w=1, y=1),
                 **saga(state='COMPENSATING', failed=1, claim=PRESENT,
                        cstart=PRESENT, reason='ResultTooLarge: too big')},
         undos=[(1, 1)], due=True),
    Case('step_failed:running:claims', failed_call(2), Reply.CLAIMED,
         seed=at_stage1(), old=RUNNING, new=COMPENSATING,
         fields={**step(2, s='F', fe='boom', t=PRESENT, tk=PRESENT,
                        x=ABSENT),
                 **stage(1, w=1),
                 **saga(state='COMPENSATING', reason='boom', failed=2,
                        claim=PRESENT, cstart=PRESENT)},
         undos=[], due=True),
    Case('step_failed:running:claims-opens-stage', failed_call(3),
         Reply.CLAIMED, seed=at_stage2(), old=RUNNING, new=COMPENSATING,
         fields={**step(3, s='F', fe='boom', t=PRESENT, tk=PRESENT),
                 **stage(2, w=0), **saga(cur=1, state='COMPENSATING',
                                         reason='boom', failed=3,
                                         claim=PRESENT, cstart=PRESENT),
                 **step(1, x='Q', a=1, d=About(UNDO_LEASE)),
                 **step(2, x='Q', a=1, d=About(UNDO_LEASE)), **stage(1, y=2)},
         undos=[(1, 1), (2, 1)], due=About(UNDO_LEASE)),
    Case('step_failed:running:first-step-nothing-to-undo', failed_call(0),
         Reply.CLAIMED, old=RUNNING, new=COMPENSATED,
         fields={**step(0, s='F', fe='boom', t=PRESENT, tk=PRESENT),
                 **stage(0, w=0),
                 **saga(state='COMPENSATED', reason='boom', failed=0,
                        claim=PRESENT, cstart=PRESENT, cur=-1,
                        ended=PRESENT, fin=PRESENT)},
         undos=[], due=False, live=False, ends=True, expires=True),
    Case('step_failed:running:cof-undoes-itself', failed_call(2),
         Reply.CLAIMED, undo_flags={2: 2}, seed=at_stage1(recorded=(1,)),
         old=RUNNING, new=COMPENSATING,
         fields={**step(2, s='F', fe='boom', t=PRESENT, tk=PRESENT, x='Q',
                        a=1, d=About(UNDO_LEASE)),
                 **stage(1, w=0, y=2), **step(1, x='Q', a=1, d=About(UNDO_LEASE)),
                 **saga(state='COMPENSATING', reason='boom', failed=2,
                        claim=PRESENT, cstart=PRESENT)},
         undos=[(1, 1), (2, 1)]),
    Case('step_failed:running:undispatched-step', failed_call(3, 'forged'),
         Reply.NOT_DISPATCHED, old=RUNNING, new=RUNNING, fields={}),
    Case('step_failed:compensating:joined', failed_call(1, 'boom 2'),
         Reply.JOINED, seed=b2_failed(), old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='F', fe='boom 2', t=PRESENT, tk=PRESENT),
                 **stage(1, w=0), **saga(cur=0, reason='boom', failed=2),
                 **step(0, x='Q', a=1, d=About(UNDO_LEASE)), **stage(0, y=1)},
         undos=[(0, 1)]),
    Case('step_failed:compensating:joined-cof', failed_call(1, 'boom 2'),
         Reply.JOINED, undo_flags={1: 2}, seed=b2_failed(),
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='F', fe='boom 2', t=PRESENT, tk=PRESENT,
                        x='Q', a=1, d=About(UNDO_LEASE)),
                 **stage(1, w=0, y=1), **saga(cur=1)},
         undos=[(1, 1)]),
    Case('step_failed:compensation_failed:joined', failed_call(1, 'boom 2'),
         Reply.JOINED, undo_flags={1: 2, 2: 2}, seed=cf_stage1_running_b1(),
         old=CF, new=CF,
         fields={**step(1, s='F', fe='boom 2', t=PRESENT, tk=PRESENT,
                        x=ABSENT),
                 **stage(1, w=0), **saga(cur=1)},
         undos=[], due=False),
    Case('step_failed:compensating:duplicate', failed_call(2, 'again'),
         Reply.DUPLICATE, seed=b2_failed(), old=COMPENSATING,
         new=COMPENSATING, fields=step(2, fe='boom')),
    Case('step_failed:compensating:replayed', twice(failed_call(2)),
         Reply.REPLAYED, seed=at_stage1(recorded=(1,)), fixed_token=True,
         old=RUNNING, new=COMPENSATING,
         fields={**step(2, s='F', fe='boom', t=PRESENT, tk='tok-resent'),
                 **stage(1, w=0, y=1), **step(1, x='Q', a=1, d=PRESENT),
                 **saga(state='COMPENSATING', reason='boom', failed=2,
                        claim='tok-resent', cstart=PRESENT)},
         undos=[(1, 1)]),
    Case('step_failed:running:completed-step', failed_call(0),
         Reply.COMPLETED_STEP, seed=at_stage1(), old=RUNNING, new=RUNNING,
         fields=step(0, s='D')),
    Case('step_failed:completed:completed-step', failed_call(3),
         Reply.COMPLETED_STEP, seed=completed(), old=COMPLETED,
         new=COMPLETED, due=False),
    Case('step_failed:missing', failed_call(0), Reply.MISSING, exists=False,
         old=None, new=None),
    Case('step_failed:running:unknown-step', failed_call(9),
         Reply.UNKNOWN_STEP, old=RUNNING, new=RUNNING),
    Case('step_failed:running:corrupt', failed_call(1), None,
         seed=seed(at_stage1(), {L.spec(1): None}),
         raises=CorruptSagaRecord, fields=step(1, s='R', p=ABSENT)),
]


@pytest.mark.parametrize('case', [param(c) for c in STEP_FAILED])
def test_step_failed(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


# -- undo_begin -----------------------------------------------------------

def begin(i: int, attempt: int, token: str = 'tb-new'):
    return lambda store, sid: store.undo_begin(sid, i, attempt, token)


UNDO_BEGIN = [
    Case('undo_begin:compensating:queued-runs', begin(1, 1, 'tb-1'),
         Reply.RUN, seed=c_failed(),
         fields=step(1, x='R', b=PRESENT, tb='tb-1', h='tb-1',
                     d=About(UNDO_LEASE)),
         due=About(UNDO_LEASE)),
    Case('undo_begin:compensating:waiting-runs', begin(1, 2, 'tb-2'),
         Reply.RUN, seed=seed(c_failed(), step(1, x='W', a=2)),
         fields=step(1, x='R', a=2, b=PRESENT, tb='tb-2', h='tb-2',
                     d=About(UNDO_LEASE))),
    Case('undo_begin:compensating:resent', begin(1, 1, 'tb-1'), Reply.RUN,
         seed=seed(c_failed(), step(1, x='R', tb='tb-1', h=1)),
         fields=step(1, x='R', tb='tb-1')),
    Case('undo_begin:compensating:other-copy-running', begin(1, 1, 'tb-2'),
         Reply.RUNNING, seed=seed(c_failed(), step(1, x='R', tb='tb-1')),
         fields=step(1, x='R', tb='tb-1')),
    Case('undo_begin:compensating:stale', begin(1, 2), Reply.STALE,
         seed=c_failed(), fields=step(1, x='Q', a=1)),
    Case('undo_begin:compensating:done', begin(1, 1), Reply.DONE,
         seed=seed(c_failed(), step(1, x='D'))),
    Case('undo_begin:compensating:not-due', begin(0, 1), Reply.NOT_DUE,
         seed=c_failed(), fields=step(0, x=ABSENT)),
    Case('undo_begin:compensation_failed:failed', begin(1, MAX),
         Reply.FAILED, seed=cf_stage1(), fields=step(1, x='F')),
    Case('undo_begin:missing', begin(1, 1), Reply.MISSING, exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in UNDO_BEGIN])
def test_undo_begin(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


# -- undo_release ---------------------------------------------------------

def release(i: int, begin_token: str):
    return lambda store, sid: store.undo_release(sid, i, begin_token)


UNDO_RELEASE = [
    Case('undo_release:compensating:released', release(1, 'tb-1'),
         Reply.RELEASED,
         seed=seed(c_failed(), step(1, x='R', tb='tb-1', h=1)),
         fields=step(1, x='Q', h=ABSENT, d=About(QT), tb='tb-1'),
         due=About(QT)),
    Case('undo_release:compensating:not-held', release(1, 'other'),
         Reply.NOT_HELD,
         seed=seed(c_failed(), step(1, x='R', tb='tb-1', h=1)),
         fields=step(1, x='R', h=1)),
    Case('undo_release:compensating:not-running', release(1, 'tb-1'),
         Reply.NOT_HELD, seed=c_failed(), fields=step(1, x='Q')),
    Case('undo_release:missing', release(1, 'tb-1'), Reply.NOT_HELD,
         exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in UNDO_RELEASE])
def test_undo_release(case, celery_app, rds, monkeypatch):
    result = run_case(case, celery_app, rds, monkeypatch)
    assert result is (case.reply is Reply.RELEASED)


# -- undo_done ------------------------------------------------------------

def undone(i: int, token: str | None = None):
    return lambda store, sid: store.undo_done(sid, i, token)


#: stage 1 settled and undone; the undo of ``a`` runs
UNDOING_A_LAST = seed(c_failed(), step(1, x='D', z='2', tu='tu1'),
                      step(2, x='D', z='2', tu='tu2'), stage(1, y=0),
                      saga(cur=0), step(0, x='R', a=1, d=FAR, h=1, tb='tb0'),
                      stage(0, y=1))

UNDO_DONE = [
    Case('undo_done:compensating:stage-not-settled', undone(1),
         Reply.UNDONE, seed=seed(c_failed(), step(1, x='R', tb='tb1')),
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, x='D', z=PRESENT, tu=PRESENT), **stage(1, y=1),
                 **saga(cur=1)},
         undos=[], due=True),
    Case('undo_done:compensating:stage-settled-opens-previous', undone(1),
         Reply.UNDONE,
         seed=seed(c_failed(), step(1, x='R', tb='tb1'),
                   step(2, x='D', z='2', tu='tu2'), stage(1, y=1)),
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, x='D', z=PRESENT, tu=PRESENT), **stage(1, y=0),
                 **saga(cur=0), **step(0, x='Q', a=1, d=About(UNDO_LEASE)),
                 **stage(0, y=1)},
         undos=[(0, 1)], due=About(UNDO_LEASE)),
    Case('undo_done:compensating:last', undone(0), Reply.UNDONE,
         seed=UNDOING_A_LAST, old=COMPENSATING, new=COMPENSATED,
         fields={**step(0, x='D', z=PRESENT, tu=PRESENT), **stage(0, y=0),
                 **saga(cur=-1, state='COMPENSATED', ended=PRESENT,
                        fin=PRESENT)},
         undos=[], due=False, live=False, ends=True, expires=True),
    Case('undo_done:compensating:late', undone(1), Reply.UNDONE,
         seed=seed(compensated(), saga(state='COMPENSATING', late=1),
                   done(1), step(1, x='R', a=1, l=1, tb='tb1', d=FAR),
                   {DUE: FAR, TTL: None, LIVE: True, ENDS: False}),
         old=COMPENSATING, new=COMPENSATED,
         fields={**step(1, x='D', z=PRESENT, tu=PRESENT),
                 **saga(late=0, state='COMPENSATED', ended=PRESENT,
                        fin=PRESENT)},
         undos=[], due=False, ends=True),
    Case('undo_done:compensating:redo', undone(1), Reply.UNDONE,
         undo_flags={1: 2},
         seed=seed(b2_failed(), done(1),
                   step(1, x='R', a=1, rd=1, tb='tb1', d=FAR, h=1),
                   stage(1, w=0, y=1)),
         old=COMPENSATING, new=COMPENSATING,
         # the second undo holds stage 1: a's undo waits for it
         fields={**step(1, x='Q', z=PRESENT, tu=PRESENT, rd=ABSENT, a=2,
                        ab=1, l=ABSENT, d=About(UNDO_LEASE), h=ABSENT),
                 **saga(late=ABSENT, cur=1), **stage(1, y=1),
                 **step(0, x=ABSENT)},
         undos=[(1, 2)]),
    Case('undo_done:compensating:opens-previous-before-late-redo',
         undone(2), Reply.UNDONE, undo_flags={1: 2},
         seed=seed(b2_failed(), done(1), done(2),
                   step(1, x='Q', a=2, ab=1, l=1, d=FAR),
                   step(2, x='R', a=1, tb='tb2', d=FAR),
                   saga(late=1), stage(1, w=0, y=1)),
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(2, x='D', z=PRESENT, tu=PRESENT), **stage(1, y=0),
                 **saga(cur=0), **step(0, x='Q', a=1, d=About(UNDO_LEASE)),
                 **stage(0, y=1), **step(1, x='Q', l=1)},
         undos=[(0, 1)]),
    Case('undo_done:compensating:duplicate', undone(1), Reply.DUPLICATE,
         seed=seed(c_failed(), step(1, x='D', tu='tu-other')),
         old=COMPENSATING, new=COMPENSATING, fields=step(1, tu='tu-other')),
    Case('undo_done:compensated:resent', twice(undone(0, 'tu-resent')),
         Reply.UNDONE, seed=UNDOING_A_LAST, old=COMPENSATING,
         new=COMPENSATED,
         fields={**step(0, x='D', z=PRESENT, tu='tu-resent'),
                 **stage(0, y=0),
                 **saga(cur=-1, state='COMPENSATED', ended=PRESENT,
                        fin='tu-resent')},
         undos=[], due=False, ends=True),
    Case('undo_done:compensating:not-due', undone(0), Reply.NOT_DUE,
         seed=c_failed(), old=COMPENSATING, new=COMPENSATING),
    Case('undo_done:compensation_failed:sibling', undone(2), Reply.UNDONE,
         seed=seed(cf_stage1(), step(2, x='R', tb='tb2', z=None, tu=None),
                   stage(1, y=2)),
         old=CF, new=CF,
         fields={**step(2, x='D', z=PRESENT, tu=PRESENT), **stage(1, y=1),
                 **saga(cur=1)},
         undos=[], due=False, live=True),
    Case('undo_done:compensation_failed:after-lost-last-attempt', undone(1),
         Reply.UNDONE,
         seed=seed(cf_stage1(), step(1, e='lost: the worker running attempt '
                                        '6 died')),
         old=CF, new=COMPENSATING,
         fields={**step(1, x='D', z=PRESENT, tu=PRESENT), **stage(1, y=0),
                 **saga(cur=0, state='COMPENSATING', ended=ABSENT),
                 **step(0, x='Q', a=1, d=About(UNDO_LEASE)), **stage(0, y=1)},
         undos=[(0, 1)], due=True, live=True),
    Case('undo_done:compensation_failed:another-failed', undone(1),
         Reply.UNDONE,
         seed=seed(cf_stage1(), step(1, e='lost: the worker running attempt '
                                        '6 died'),
                   step(2, x='F', a=MAX, e='RuntimeError: e'), stage(1, y=2)),
         old=CF, new=CF,
         fields={**step(1, x='D', z=PRESENT, tu=PRESENT), **stage(1, y=1),
                 **saga(cur=1, state='COMPENSATION_FAILED')},
         undos=[], due=False, live=True),
    Case('undo_done:compensating:corrupt', undone(1), None,
         seed=seed(c_failed(), step(1, x='R', u=None)),
         raises=CorruptSagaRecord, fields=step(1, x='R')),
    Case('undo_done:missing', undone(1), Reply.MISSING, exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in UNDO_DONE])
def test_undo_done(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


# -- undo_failed ----------------------------------------------------------

def undo_failed(i: int, attempt: int, started: bool = True,
                countdown: float = 0.0, error: str = 'RuntimeError: x'):
    return lambda store, sid: store.undo_failed(
        sid, i, attempt, error, started, countdown)


RUNNING_B1_UNDO = seed(c_failed(), step(1, x='R', tb='tb1', h=1))

UNDO_FAILED = [
    Case('undo_failed:compensating:retry', undo_failed(1, 1, countdown=5),
         Reply.RETRY, seed=RUNNING_B1_UNDO, old=COMPENSATING,
         new=COMPENSATING,
         fields=step(1, x='W', a=2, e='RuntimeError: x', tu=PRESENT,
                     h=ABSENT, d=About(UNDO_LEASE + 5)),
         undos=[(1, 2)]),
    Case('undo_failed:compensating:budget-spent', undo_failed(1, MAX),
         Reply.FAILED, seed=seed(RUNNING_B1_UNDO, step(1, a=MAX)),
         old=COMPENSATING, new=CF,
         fields={**step(1, x='F', e='RuntimeError: x', tu=PRESENT),
                 **saga(state='COMPENSATION_FAILED', ended=PRESENT,
                        cf=PRESENT)},
         due=False, live=True, ends=False, expires=False),
    Case('undo_failed:compensation_failed:budget-spent-again',
         undo_failed(2, MAX), Reply.FAILED,
         seed=seed(cf_stage1(), step(2, x='R', a=MAX, z=None, tu=None),
                   stage(1, y=2)),
         old=CF, new=CF,
         fields={**step(2, x='F', e='RuntimeError: x', tu=PRESENT),
                 **saga(cf='tok-cf', ended='2')},
         due=False),
    Case('undo_failed:compensating:stale', undo_failed(1, 3), Reply.STALE,
         seed=RUNNING_B1_UNDO, old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='R', a=1)),
    Case('undo_failed:compensating:ignored-done', undo_failed(1, 1),
         Reply.IGNORED, seed=seed(c_failed(), step(1, x='D')),
         old=COMPENSATING, new=COMPENSATING),
    Case('undo_failed:compensating:ignored-not-due', undo_failed(0, 1),
         Reply.IGNORED, seed=c_failed(), old=COMPENSATING, new=COMPENSATING,
         fields=step(0, x=ABSENT)),
    Case('undo_failed:compensating:never-started-copy',
         undo_failed(1, 1, started=False), Reply.RUNNING,
         seed=RUNNING_B1_UNDO, old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='R', a=1, e=ABSENT)),
    Case('undo_failed:compensating:never-started-counts',
         undo_failed(1, 1, started=False, error='revoked'), Reply.RETRY,
         seed=c_failed(), old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='W', a=2, e='revoked', tu=PRESENT,
                     d=About(UNDO_LEASE)),
         undos=[(1, 2)]),
    Case('undo_failed:compensating:resent-retry', twice(undo_failed(1, 1)),
         Reply.RETRY, seed=RUNNING_B1_UNDO, fixed_token=True,
         old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='W', a=2, e='RuntimeError: x', tu='tok-resent',
                     h=ABSENT, d=About(UNDO_LEASE)),
         undos=[(1, 2)]),
    Case('undo_failed:missing', undo_failed(1, 1), Reply.MISSING,
         exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in UNDO_FAILED])
def test_undo_failed(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


# -- renew ----------------------------------------------------------------

def renew(i: int, attempt: int | None = None):
    return lambda store, sid: store.renew([(sid, i, attempt)])


RENEW = [
    Case('renew:running:takes-queued-step', renew(0), Reply.RENEWED,
         fields=step(0, h='-', d=About(LEASE)), due=About(LEASE)),
    Case('renew:running:extends-held-step', renew(0), Reply.RENEWED,
         seed=seed(step(0, h=1, d=LAPSED), {DUE: 1}),
         fields=step(0, h=1, d=About(LEASE)), due=1.0),
    Case('renew:running:never-shortens', renew(0), Reply.RENEWED,
         seed=step(0, h=1, d=FAR), fields=step(0, d=FAR)),
    Case('renew:running:settled-step', renew(0), Reply.GONE,
         seed=at_stage1(), fields=step(0, h=ABSENT)),
    Case('renew:compensating:takes-undo', renew(1, 1), Reply.RENEWED,
         seed=c_failed(), fields=step(1, h='-', d=About(UNDO_LEASE)),
         due=About(UNDO_LEASE)),
    Case('renew:compensating:stale-attempt', renew(1, 2), Reply.GONE,
         seed=c_failed(), fields=step(1, h=ABSENT, d=FAR)),
    Case('renew:missing', renew(0), Reply.GONE, exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in RENEW])
def test_renew(case, celery_app, rds, monkeypatch):
    count = run_case(case, celery_app, rds, monkeypatch)
    assert count == (1 if case.reply is Reply.RENEWED else 0)


# -- receive, release, confirm ----------------------------------------------

def receive(i: int, attempt: int | None = None, generation: int = 1):
    return lambda store, sid: store.receive(sid, i, attempt, generation,
                                            'hold-new')


def left(i: int, succeeded: bool, holder: str = 'hold-1'):
    return lambda store, sid: store.left([(sid, i, holder, succeeded)])


def in_outbox() -> dict[str, Any]:
    """RUNNING: ``a`` done by a call whose publishing of ``b1``/``b2`` is
    not confirmed yet (their step lease runs)."""
    return seed(at_stage1(), step(1, ob=1), step(2, ob=1), stage(1, pb=0))


RECEIVE = [
    Case('receive:running:queued-step-held', receive(0), Reply.HELD,
         fields=step(0, h='hold-new', d=About(LEASE)), due=About(LEASE)),
    Case('receive:running:outbox-step-held', receive(1), Reply.HELD,
         seed=in_outbox(),
         fields=step(1, h='hold-new', d=About(LEASE), ob=ABSENT),
         due=About(LEASE)),
    Case('receive:compensating:aborted-step-received-in-its-grace',
         receive(1), Reply.HELD,
         seed=seed(at_stage1(), saga(state='COMPENSATING', claim='c',
                                     reason='aborted: test'),
                   step(1, fe='aborted: test', d=LAPSED)),
         fields=step(1, h='hold-new', fe=ABSENT, d=About(LEASE), s='R')),
    Case('receive:running:another-holder-taken-over', receive(1),
         Reply.HELD, seed=at_stage1(held=(1,)),
         fields=step(1, h='hold-new', d=About(LEASE))),
    Case('receive:running:same-holder', lambda store, sid: store.receive(
        sid, 1, None, 1, '1'), Reply.HELD, seed=at_stage1(held=(1,)),
         fields=step(1, h=1, d=FAR)),
    Case('receive:running:done-refused', receive(0), Reply.DONE,
         seed=at_stage1(), fields=step(0, s='D', h=ABSENT)),
    Case('receive:compensating:given-up-refused', receive(2), Reply.GIVEN_UP,
         seed=b2_failed(), fields=step(2, s='F', h=ABSENT)),
    Case('receive:running:older-generation-refused', receive(1),
         Reply.STALE, seed=seed(at_stage1(), step(1, pg=2)),
         fields=step(1, h=ABSENT, pg=2)),
    Case('receive:running:current-generation-held', receive(1, None, 2),
         Reply.HELD, seed=seed(at_stage1(), step(1, pg=2)),
         fields=step(1, h='hold-new', pg=2, d=About(LEASE))),
    Case('receive:running:not-dispatched-refused', receive(3),
         Reply.NOT_DISPATCHED, fields=step(3, s='P', h=ABSENT)),
    Case('receive:running:unknown-step', receive(9), Reply.UNKNOWN_STEP),
    Case('receive:compensating:queued-undo-held', receive(1, 1), Reply.HELD,
         seed=c_failed(), fields=step(1, h='hold-new', d=About(UNDO_LEASE)),
         due=About(UNDO_LEASE)),
    Case('receive:compensating:running-undo-untouched', receive(1, 1),
         Reply.HELD, seed=seed(c_failed(), step(1, x='R', tb='tb1', h='tb1')),
         fields=step(1, h='tb1', d=FAR)),
    Case('receive:compensating:stale-undo-attempt', receive(1, 2),
         Reply.GONE, seed=c_failed(), fields=step(1, h=ABSENT)),
    Case('receive:missing', receive(0), Reply.MISSING, exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in RECEIVE])
def test_receive(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


RELEASE_CONFIRM = [
    Case('release:running:held-step-queued-again', left(1, False),
         Reply.RELEASED, seed=seed(at_stage1(), step(1, h='hold-1')),
         fields=step(1, h=ABSENT, d=About(QT), s='R'), due=True),
    Case('release:running:held-by-another-copy', left(1, False),
         Reply.NOT_HELD, seed=seed(at_stage1(), step(1, h='hold-2')),
         fields=step(1, h='hold-2', d=FAR)),
    Case('release:running:settled', left(0, False), Reply.NOT_HELD,
         seed=at_stage1(), fields=step(0, s='D')),
    Case('confirm:running:outbox-to-queue', left(0, True), Reply.CONFIRMED,
         seed=seed(in_outbox(), step(1, d='100.000'), step(2, d='100.000')),
         fields={**step(1, ob=ABSENT, d=About(QT)),
                 **step(2, ob=ABSENT, d=About(QT))},
         due=About(QT)),
    Case('confirm:running:received-member-keeps-its-lease', left(0, True),
         Reply.CONFIRMED, seed=seed(in_outbox(), step(1, h='w1', ob=None)),
         fields={**step(1, h='w1', d=FAR),
                 **step(2, ob=ABSENT, d=About(QT))}),
    Case('confirm:running:not-the-publisher', left(1, True), Reply.GONE,
         seed=seed(in_outbox(), done(1), stage(1, w=1)),
         fields=step(2, ob=1)),
    Case('confirm:running:nothing-in-the-outbox', left(0, True), Reply.GONE,
         seed=seed(at_stage1(), stage(1, pb=0)), fields=step(1, d=FAR)),
]


@pytest.mark.parametrize('case', [param(c) for c in RELEASE_CONFIRM])
def test_release_and_confirm(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


def sent(*triples: tuple[int, int, float]):
    return lambda store, sid: store.undo_sent(sid, list(triples))


UNDO_SENT = [
    Case('undo_sent:compensating:queued-lease', sent((1, 1, 0), (2, 1, 2.0)),
         Reply.CONFIRMED, seed=seed(c_failed(), step(1, d=LAPSED),
                                    step(2, d=LAPSED)),
         fields={**step(1, x='Q', d=About(QT)),
                 **step(2, x='Q', d=About(QT + 2))}),
    Case('undo_sent:compensating:already-received', sent((1, 1, 0)),
         Reply.GONE, seed=seed(c_failed(), step(1, h='w1')),
         fields=step(1, h='w1', d=FAR)),
    Case('undo_sent:compensating:superseded', sent((1, 1, 0)), Reply.GONE,
         seed=seed(c_failed(), step(1, x='W', a=2)),
         fields=step(1, x='W', a=2, d=FAR)),
]


@pytest.mark.parametrize('case', [param(c) for c in UNDO_SENT])
def test_undo_sent(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)




# -- recover --------------------------------------------------------------

def recover(store: SagaStore, sid: str) -> Outcome:
    return store.recover(sid)


HELD_LOST = 'lost: its worker died (no lease renewal for'
QUEUED_LOST = 'lost: no worker took it from the broker within'

RECOVER = [
    Case('recover:running:held-step-lost', recover, Reply.RECOVERED,
         seed=seed(at_stage1(held=(1,)), step(1, d=LAPSED), {DUE: 1}),
         old=RUNNING, new=COMPENSATING,
         fields={**step(1, s='F', fe=Has(HELD_LOST), t=PRESENT, tk=PRESENT),
                 **stage(1, w=1),
                 **saga(state='COMPENSATING', reason=Has(HELD_LOST),
                        failed=1, claim=PRESENT, cstart=PRESENT)},
         undos=[], stopped=[1], due=True),
    Case('recover:running:queued-step-lost', recover, Reply.RECOVERED,
         seed=seed(step(0, d=LAPSED), {DUE: 1}), old=RUNNING,
         new=COMPENSATED,
         fields={**step(0, s='F', fe=Has(QUEUED_LOST), t=PRESENT,
                        tk=PRESENT),
                 **stage(0, w=0),
                 **saga(state='COMPENSATED', reason=Has(QUEUED_LOST),
                        failed=0, claim=PRESENT, cstart=PRESENT, cur=-1,
                        ended=PRESENT, fin=PRESENT)},
         undos=[], stopped=[0], due=False, live=False, ends=True),
    Case('recover:running:cof-step-lost', recover, Reply.RECOVERED,
         undo_flags={1: 2},
         seed=seed(at_stage1(held=(1,)), step(1, d=LAPSED), {DUE: 1}),
         old=RUNNING, new=COMPENSATING,
         fields={**step(1, s='F', fe=Has(HELD_LOST), t=PRESENT, tk=PRESENT,
                        x='Q', a=1, d=About(UNDO_LEASE), h=ABSENT),
                 **stage(1, w=1, y=1),
                 **saga(state='COMPENSATING', reason=Has(HELD_LOST),
                        failed=1, claim=PRESENT, cstart=PRESENT)},
         undos=[(1, 1)], stopped=[1]),
    Case('recover:running:outbox-step-published-again', recover,
         Reply.RECOVERED,
         seed=seed(in_outbox(), step(1, d=LAPSED), {DUE: 1}),
         old=RUNNING, new=RUNNING,
         fields={**step(1, s='R', ob=ABSENT, pg=2, d=About(QT), h=ABSENT),
                 **step(2, ob=1, d=FAR)},
         forward=[1], results=['r0'], undos=[], stopped=[], due=About(QT)),
    Case('recover:running:outbox-step-with-a-bad-spec-given-up', recover,
         Reply.RECOVERED,
         seed=seed(in_outbox(), step(1, d=LAPSED, p='{"index": 1, "st'),
                   {DUE: 1}),
         old=RUNNING, new=COMPENSATING,
         fields={**step(1, s='F', fe=Has(QUEUED_LOST), t=PRESENT,
                        tk=PRESENT, ob=1, pg=ABSENT),
                 **stage(1, w=1),
                 **saga(state='COMPENSATING', reason=Has(QUEUED_LOST),
                        failed=1, claim=PRESENT, cstart=PRESENT)},
         undos=[], stopped=[1], due=True),
    Case('recover:compensating:aborted-step-nobody-received', recover,
         Reply.RECOVERED,
         seed=seed(at_stage1(), saga(state='COMPENSATING',
                                     reason='aborted: test', claim='c',
                                     cstart='1'),
                   step(1, fe='aborted: test', d=LAPSED),
                   step(2, h='w2'), {DUE: 1}),
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='F', fe='aborted: test', t=PRESENT,
                        tk=PRESENT),
                 **stage(1, w=1), **step(2, s='R', h='w2')},
         undos=[], stopped=[1], due=True),
    Case('recover:running:not-lapsed', recover, Reply.RECOVERED,
         seed=seed(at_stage1(), {DUE: 1}), old=RUNNING, new=RUNNING,
         undos=[], stopped=[], due=float(FAR)),
    Case('recover:compensating:sibling-lost', recover, Reply.RECOVERED,
         seed=seed(b2_failed(), step(1, h=1, d=LAPSED), {DUE: 1}),
         old=COMPENSATING, new=COMPENSATING,
         fields={**step(1, s='F', fe=Has(HELD_LOST), t=PRESENT, tk=PRESENT),
                 **stage(1, w=0), **saga(cur=0, reason='boom', failed=2),
                 **step(0, x='Q', a=1, d=About(UNDO_LEASE)), **stage(0, y=1)},
         undos=[(0, 1)], stopped=[1]),
    Case('recover:compensating:queued-undo-resent', recover, Reply.RECOVERED,
         seed=seed(c_failed(), step(1, d=LAPSED), {DUE: 1}),
         old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='Q', a=1, d=About(UNDO_LEASE), h=ABSENT),
         undos=[(1, 1)], stopped=[], due=About(UNDO_LEASE)),
    Case('recover:compensating:waiting-undo-resent', recover,
         Reply.RECOVERED,
         seed=seed(c_failed(), step(1, x='W', a=2, d=LAPSED), {DUE: 1}),
         old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='W', a=2, d=About(UNDO_LEASE)), undos=[(1, 2)]),
    Case('recover:compensating:running-undo-lost', recover, Reply.RECOVERED,
         seed=seed(c_failed(), step(1, x='R', tb='tb1', h=1, d=LAPSED),
                   {DUE: 1}),
         old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='W', a=2, e='lost: the worker running attempt 1 '
                     'died', tu=PRESENT, h=ABSENT, d=About(UNDO_LEASE)),
         undos=[(1, 2)], stopped=[]),
    Case('recover:compensating:running-undo-lost-last-attempt', recover,
         Reply.RECOVERED,
         seed=seed(c_failed(), step(1, x='R', a=MAX, tb='tb1', h=1,
                                    d=LAPSED), {DUE: 1}),
         old=COMPENSATING, new=CF,
         fields={**step(1, x='F', e=Has('lost: the worker running attempt'),
                        tu=PRESENT),
                 **saga(state='COMPENSATION_FAILED', ended=PRESENT,
                        cf=PRESENT)},
         undos=[], due=False, live=True),
    Case('recover:compensating:late-undo-resent', recover, Reply.RECOVERED,
         seed=seed(undoing_a(), done(1), step(1, x='Q', a=1, l=1, d=LAPSED),
                   saga(late=1), {DUE: 1}),
         old=COMPENSATING, new=COMPENSATING,
         fields=step(1, x='Q', d=About(UNDO_LEASE)), undos=[(1, 1)]),
    Case('recover:completed:inactive', recover, Reply.INACTIVE,
         seed=seed(completed(), {DUE: 1}), old=COMPLETED, new=COMPLETED,
         due=False),
    Case('recover:compensation_failed:inactive', recover, Reply.INACTIVE,
         seed=seed(cf_stage1(), step(2, x='Q', d=LAPSED), {DUE: 1}),
         old=CF, new=CF, fields=step(2, x='Q', d=LAPSED), due=False,
         live=True),
    Case('recover:running:stuck', recover, Reply.STUCK,
         seed=seed(done(0), {DUE: 1}), old=RUNNING, new=RUNNING,
         undos=[], stopped=[], due=True),
    Case('recover:missing', recover, Reply.MISSING, exists=False,
         due=False, live=False, sagas=False),
]


@pytest.mark.parametrize('case', [param(c) for c in RECOVER])
def test_recover(case, celery_app, rds, monkeypatch):
    if case.id == 'recover:missing':
        # a record deleted (expired) while still indexed
        store = get_state(celery_app).store
        assert store.create(SID, plan({}))
        rds.delete(store.keys.saga(SID))
    run_case(case, celery_app, rds, monkeypatch)


# -- abort ----------------------------------------------------------------

def abort(token: str | None = None):
    return lambda store, sid: store.abort(sid, 'aborted: test', token)


ABORT = [
    Case('abort:running:queued-step-waits-a-heartbeat', abort(),
         Reply.ABORTED, seed=in_outbox(), old=RUNNING, new=COMPENSATING,
         fields={**step(1, s='R', fe='aborted: test', d=About(HEARTBEAT),
                        ob=ABSENT),
                 **step(2, s='R', fe='aborted: test', d=About(HEARTBEAT),
                        ob=ABSENT),
                 **stage(1, w=2),
                 **saga(state='COMPENSATING', reason='aborted: test',
                        claim=PRESENT, cstart=PRESENT, cur=1,
                        failed=ABSENT),
                 **step(0, x=ABSENT)},
         undos=[], stopped=[1, 2], due=About(HEARTBEAT)),
    Case('abort:running:held-step-stays', abort(), Reply.ABORTED,
         seed=at_stage1(held=(1,)), old=RUNNING, new=COMPENSATING,
         fields={**step(1, s='R', h=1, d=FAR),
                 **step(2, s='R', fe='aborted: test', d=About(HEARTBEAT)),
                 **stage(1, w=2),
                 **saga(state='COMPENSATING', reason='aborted: test',
                        claim=PRESENT, cstart=PRESENT, cur=1)},
         undos=[], stopped=[1, 2], due=True),
    Case('abort:running:first-stage', abort(), Reply.ABORTED,
         old=RUNNING, new=COMPENSATING,
         fields={**step(0, s='R', fe='aborted: test', d=About(HEARTBEAT)),
                 **stage(0, w=1),
                 **saga(state='COMPENSATING', reason='aborted: test',
                        claim=PRESENT, cstart=PRESENT, cur=0)},
         undos=[], stopped=[0], due=About(HEARTBEAT), live=True),
    Case('abort:running:resent', twice(abort('tok-abort')), Reply.ABORTED,
         seed=at_stage1(held=(1,)), old=RUNNING, new=COMPENSATING,
         fields={**step(1, s='R'),
                 **step(2, s='R', fe='aborted: test', d=About(HEARTBEAT)),
                 **stage(1, w=2),
                 **saga(state='COMPENSATING', reason='aborted: test',
                        claim='tok-abort', cstart=PRESENT)},
         undos=[], stopped=[1, 2]),
    Case('abort:compensating:not-running', abort(), Reply.NOT_RUNNING,
         seed=b2_failed(), old=COMPENSATING, new=COMPENSATING,
         fields=saga(reason='boom'), stopped=[]),
    Case('abort:completed:not-running', abort(), Reply.NOT_RUNNING,
         seed=completed(), old=COMPLETED, new=COMPLETED),
    Case('abort:compensated:not-running', abort(), Reply.NOT_RUNNING,
         seed=compensated(), old=COMPENSATED, new=COMPENSATED),
    Case('abort:compensation_failed:not-running', abort(), Reply.NOT_RUNNING,
         seed=cf_stage1(), old=CF, new=CF),
    Case('abort:missing', abort(), Reply.MISSING, exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in ABORT])
def test_abort(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


# -- retry ----------------------------------------------------------------

def retry(token: str | None = None):
    return lambda store, sid: store.retry(sid, token)


RETRY = [
    Case('retry:compensation_failed:retried', retry(), Reply.RETRIED,
         seed=cf_stage1(), old=CF, new=COMPENSATING,
         fields={**step(1, x='Q', a=MAX + 1, ab=MAX, d=About(UNDO_LEASE), h=ABSENT),
                 **saga(state='COMPENSATING', rt=PRESENT, retries=1,
                        ended=ABSENT)},
         undos=[(1, MAX + 1)], due=About(UNDO_LEASE), live=True),
    Case('retry:compensation_failed:resent', twice(retry('tok-rt')),
         Reply.RETRIED, seed=cf_stage1(), old=CF, new=COMPENSATING,
         fields={**step(1, x='Q', a=MAX + 1, ab=MAX, d=About(UNDO_LEASE)),
                 **saga(state='COMPENSATING', rt='tok-rt', retries=1,
                        ended=ABSENT)},
         undos=[(1, MAX + 1)]),
    Case('retry:compensation_failed:late-and-redo', retry(), Reply.RETRIED,
         seed=seed(cf_stage0(), done(1), step(1, rd=1)), old=CF,
         new=COMPENSATING,
         fields={**step(0, x='Q', a=MAX + 1, ab=MAX, d=About(UNDO_LEASE)),
                 **step(1, x='Q', a=1, ab=0, l=1, rd=ABSENT, d=About(UNDO_LEASE)),
                 **saga(state='COMPENSATING', rt=PRESENT, retries=1,
                        ended=ABSENT, late=1)},
         undos=[(0, MAX + 1), (1, 1)]),
    Case('retry:compensation_failed:opens-completed-late-member', retry(),
         Reply.RETRIED, undo_flags={2: 2},
         seed=seed(cf_stage1_running_b1(), done(1), stage(1, w=0)),
         old=CF, new=COMPENSATING,
         fields={**step(2, x='Q', a=MAX + 1, ab=MAX, d=About(UNDO_LEASE)),
                 **step(1, x='Q', a=1, d=About(UNDO_LEASE)), **stage(1, y=2),
                 **saga(state='COMPENSATING', rt=PRESENT, retries=1,
                        ended=ABSENT)},
         undos=[(2, MAX + 1), (1, 1)]),
    Case('retry:compensation_failed:nothing-failed', retry(), Reply.RETRIED,
         seed=seed(cf_stage1(), step(1, x='D', z='2'), stage(1, y=0)),
         old=CF, new=COMPENSATING,
         fields={**saga(state='COMPENSATING', rt=PRESENT, retries=1,
                        ended=ABSENT, cur=0),
                 **step(0, x='Q', a=1, d=About(UNDO_LEASE)), **stage(0, y=1)},
         undos=[(0, 1)]),
    Case('retry:running:wrong-state', retry(), Reply.WRONG_STATE,
         seed=at_stage1(), old=RUNNING, new=RUNNING),
    Case('retry:completed:wrong-state', retry(), Reply.WRONG_STATE,
         seed=completed(), old=COMPLETED, new=COMPLETED),
    Case('retry:compensating:wrong-state', retry(), Reply.WRONG_STATE,
         seed=c_failed(), old=COMPENSATING, new=COMPENSATING),
    Case('retry:compensated:wrong-state', retry(), Reply.WRONG_STATE,
         seed=compensated(), old=COMPENSATED, new=COMPENSATED),
    Case('retry:compensation_failed:corrupt', retry(), None,
         seed=seed(cf_stage1(), {L.undo_flag(3): None}),
         raises=CorruptSagaRecord, fields=step(1, x='F')),
    Case('retry:missing', retry(), Reply.MISSING, exists=False),
]


@pytest.mark.parametrize('case', [param(c) for c in RETRY])
def test_retry(case, celery_app, rds, monkeypatch):
    run_case(case, celery_app, rds, monkeypatch)


# -- start ----------------------------------------------------------------

def create(store: SagaStore, sid: str) -> bool:
    return store.create(sid, plan({}))


START = [
    Case('start:new:created', create, Reply.CREATED, exists=False,
         fields={**saga(state='RUNNING', cur=0, n=4),
                 **step(0, s='R', d=About(QT), o=LEASE, ou=UNDO_LEASE),
                 **step(1, s='P', d=ABSENT), **stage(0, w=1),
                 **stage(1, g='1,2'), L.TOKEN: PRESENT, L.ID: SID},
         due=About(QT), live=True, sagas=True, ends=False),
    Case('start:exists', create, Reply.EXISTS, seed=at_stage1(),
         fields=step(0, s='D'), due=True),
    Case('start:resent', twice(create), Reply.CREATED, exists=False,
         fixed_token=True,
         fields={**saga(state='RUNNING'), L.TOKEN: 'tok-resent'},
         due=About(QT), live=True),
    Case('start:reused-id', create, Reply.CREATED, exists=False,
         seed={ENDS: True}, fields=saga(state='RUNNING'), ends=False,
         sagas=True),
]


@pytest.mark.parametrize('case', [param(c) for c in START])
def test_start(case, celery_app, rds, monkeypatch):
    created = run_case_start(case, celery_app, rds, monkeypatch)
    assert created is (case.reply is Reply.CREATED)


def run_case_start(case: Case, celery_app: Any, rds: Any,
                   monkeypatch: pytest.MonkeyPatch) -> Any:
    """A start creates every field: only the named ones are checked."""
    if case.exists:
        return run_case(case, celery_app, rds, monkeypatch)
    store = get_state(celery_app).store
    shard = L.shard_of(SID)
    if case.seed.get(ENDS):
        rds.zadd(store.keys.ends(shard), {SID: 1})
    raw = _spy(store, case, monkeypatch)
    sec, usec = rds.time()
    now = sec + usec / 1e6
    result = case.call(store, SID)
    assert Reply(raw[-1]) is case.reply
    after = rds.hgetall(store.keys.saga(SID))
    for name, expected in case.fields.items():
        assert matches(expected, after.get(name), now), (
            name, after.get(name), expected)
    checks = (('due', case.due), ('live', case.live), ('ends', case.ends),
              ('sagas', case.sagas))
    for name, want in checks:
        if want is None:
            continue
        score = rds.zscore(getattr(store.keys, name)(shard), SID)
        if isinstance(want, About):
            assert matches(want, score, now), (name, score)
        else:
            assert (score is not None) is want, (name, score)
    return result


# -- scan -----------------------------------------------------------------

@dataclass
class ScanCase:
    id: str
    due_score: float | None      #: the saga's :due score (None: absent)
    swept: bool                  #: the shard was swept a moment ago
    held: bool                   #: the scan holds off
    found: bool                  #: the saga is returned as due
    expired_end: bool = False    #: its :ends entry is in the past


SCAN = [
    ScanCase('scan:due', 1.0, swept=True, held=False, found=True),
    ScanCase('scan:not-due', float(FAR), swept=True, held=False,
             found=False),
    ScanCase('scan:held-after-gap', 1.0, swept=False, held=True,
             found=False),
    ScanCase('scan:trims-expired', None, swept=True, held=False,
             found=False, expired_end=True),
]


@pytest.mark.parametrize('case', [pytest.param(c, id=c.id) for c in SCAN])
def test_scan(case, celery_app, rds):
    store = get_state(celery_app).store
    shard = L.shard_of(SID)
    assert store.create(SID, plan({}))
    if case.due_score is None:
        rds.zrem(store.keys.due(shard), SID)
    else:
        rds.zadd(store.keys.due(shard), {SID: case.due_score})
    if case.expired_end:
        rds.zadd(store.keys.ends(shard), {SID: 1})
    if case.swept:
        store.due(10, 60.0, 0.0)      # a sweep a moment ago, no hold
    held, ids, full = store.due(10, 60.0, 5.0)
    assert (held > 0) is case.held, held
    assert (SID in ids) is case.found, ids
    assert full == []
    if case.expired_end:
        assert rds.zscore(store.keys.ends(shard), SID) is None
        assert rds.zscore(store.keys.sagas(shard), SID) is None
