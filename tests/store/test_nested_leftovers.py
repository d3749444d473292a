"""Nested sagas that outlive their parent's interest, from a second
adversarial review (each test failed before its fix): a child still at
work or COMPENSATION_FAILED when its root ended (``xp``), a leftover child
of an earlier saga with the same id (``ptk``), a child's late failure
after its parent recorded it undone, and a report whose work is not done
yet."""
from __future__ import annotations

import time

import pytest

from celery_compensate import SagaState
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef
from celery_compensate.store import Reply
from celery_compensate.store import layout as L

from .nested import (
    UNDO, SAGA, child_compensated_then_reported, child_plan, deliver,
    due_score, make, parent_plan, reversed_parent, started,
)



def counters(rds, store, sid):
    h = store.keys.saga(sid)
    return {f: v for f, v in rds.hgetall(h).items()
            if f in ('late', 'cur', 'state') or f.startswith('y')
            or f.startswith('l') and f[1:].isdigit()
            or f.startswith('x') and f[1:].isdigit()}


def _cf_child_after_root_ended(celery_app, rds):
    """Root p ends COMPENSATED while its child is reopened by a late
    completer (xp); the child's late undo then spends its budget: the child
    is COMPENSATION_FAILED on its own (its root ended: no report)."""
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = child_compensated_then_reported(store)
    late = store.step_done(child, 1, '"rc"')
    assert late.new_state is SagaState.COMPENSATING
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    ckey = store.keys.saga(child)
    assert rds.hget(ckey, 'xp') == '1'
    store.undo_failed(child, 1, 1, 'no', countdown=0)
    cf = store.undo_failed(child, 1, 2, 'no again', countdown=0)
    assert cf.new_state is SagaState.COMPENSATION_FAILED
    coordinator.settled(child, cf)
    return store, child


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_failed_child_whose_root_ended_can_be_forgotten(celery_app, rds):
    store, child = _cf_child_after_root_ended(celery_app, rds)
    ckey = store.keys.saga(child)
    # the root ended (xp): COMPENSATION_FAILED waits for an operator, who
    # may give up on it with forget() like on any COMPENSATION_FAILED saga
    rds.delete(store.keys.saga('p'))        # the root's ttl ran out
    assert rds.ttl(ckey) == -1
    assert store.forget(child)[0] is Reply.FORGOTTEN


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_leftover_child_is_not_taken_for_a_new_sagas_child(
        celery_app, rds):
    """A COMPENSATION_FAILED child of an earlier saga with id p is left
    (it waits for an operator).  A new saga p: its step 1 is given up
    before its child starts (start ORPHAN: the leftover is not replaced).
    The undo of step 1 finds no child of its own (the leftover's ``ptk``
    is not p's ``tok``: GONE) and is done; the leftover is left alone."""
    store, child = _cf_child_after_root_ended(celery_app, rds)
    coordinator = get_state(celery_app).coordinator
    rds.delete(store.keys.saga('p'))        # the earlier root expired
    make(celery_app)                        # the id is reused
    assert store.step_done('p', 0, '"ra2"').status is Reply.NEXT
    coordinator.abort('p', 'customer cancelled')
    # the publisher of stage 1 starts the child now: ORPHAN, the step fails
    step = parent_plan().steps[1]
    coordinator.nesting.start('p', step, ['ra2'], {})
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.step_state(1)) == 'F'
    # the undo of a child never started: nothing to undo (UNWIND GONE)
    assert rds.hget(parent, L.undo_state(1)) == 'D', (
        rds.hget(parent, L.undo_state(1)),
        rds.hget(parent, L.undo_error(1)))
    assert rds.hget(parent, L.undo_error(1)) is None
    # the earlier saga's child is left alone
    assert store.get_state(child) is SagaState.COMPENSATION_FAILED


def _g_plan() -> Plan:
    return Plan.from_stages([[(TaskRef('t.e'), UNDO, False)]])


def _c_plan() -> Plan:
    """p~1: G (p~1~0: e), then c"""
    return Plan.from_stages([
        [(SAGA, None, False, None, None, 0.0, False, _g_plan())],
        [(TaskRef('t.c'), UNDO, False)],
    ])


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_replaced_leftover_child_goes_with_its_own_children(celery_app, rds):
    """Three levels; p ends COMPENSATED while p~1 is reopened by a late
    completer and later ends COMPENSATION_FAILED (its settled grandchild
    G keeps no TTL: its parent never ended).  p expires, the id is reused
    with a flat child at step 1: start replaces p~1 and deletes G with
    it."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([
        [(TaskRef('t.a'), UNDO, False)],
        [(SAGA, None, False, None, None, 0.0, False, _c_plan())],
        [(TaskRef('t.d'), UNDO, False)],
    ])
    assert store.create('p', plan)
    store.step_done('p', 0, '"ra"')
    assert store.start('p~1', _c_plan(), parent=('p', 1)) is Reply.CREATED
    assert store.start('p~1~0', _g_plan(),
                       parent=('p~1', 0)) is Reply.CREATED
    assert store.step_done('p~1~0', 0, '"re"').status is Reply.COMPLETED
    rep = store.report('p~1~0')
    assert store.step_done('p~1', 0, '"re"', rep.token).status is Reply.NEXT
    store.reported('p~1~0', rep.token)
    # c lost: p~1 undoes G as a unit, then is COMPENSATED
    assert store.step_failed('p~1', 1, 'lost').status is Reply.CLAIMED
    assert store.unwind('p~1', 0, 1, 'u').status is Reply.UNWINDING
    assert store.undo_done('p~1~0', 0).new_state is SagaState.COMPENSATED
    rep = store.report('p~1~0')
    assert store.undo_done('p~1', 0, rep.token).new_state \
        is SagaState.COMPENSATED
    store.reported('p~1~0', rep.token)
    rep = store.report('p~1')
    store.step_failed('p', 1, 'child compensated', token=rep.token)
    store.reported('p~1', rep.token)
    assert store.unwind('p', 1, 1, 'u1').status is Reply.REPORT
    rep = store.report('p~1')
    assert store.undo_done('p', 1, rep.token).status is Reply.UNDONE
    store.reported('p~1', rep.token)
    # c completes after all: p~1 at work again; p ends
    assert store.step_done('p~1', 1, '"rc"').status is Reply.LATE
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    store.undo_failed('p~1', 1, 1, 'no', countdown=0)
    assert store.undo_failed('p~1', 1, 2, 'no', countdown=0).new_state \
        is SagaState.COMPENSATION_FAILED
    gkey = store.keys.saga('p~1~0')
    assert rds.ttl(gkey) == -1
    rds.delete(store.keys.saga('p'))            # p's ttl ran out
    # the id is reused, with a flat child at step 1
    make(celery_app)
    store.step_done('p', 0, '"ra2"')
    assert store.start('p~1', child_plan(), parent=('p', 1)) is Reply.CREATED
    store.step_done('p~1', 0, '"rb"')
    store.step_done('p~1', 1, '"rc"')
    rep = store.report('p~1')
    store.step_done('p', 1, '"rc"', rep.token)
    store.reported('p~1', rep.token)
    assert store.step_done('p', 2, '"rd"').status is Reply.COMPLETED
    # the new tree ended and expires; the old G should not outlive it
    assert rds.ttl(store.keys.saga('p~1')) > 0
    live = store.keys.for_saga('p~1~0')[4]
    assert (rds.ttl(gkey) > 0 or not rds.exists(gkey)), (
        rds.ttl(gkey), rds.hget(gkey, L.STATE), rds.zscore(live, 'p~1~0'),
        store.forget('p~1~0'))


def test_a_completed_childs_report_stays_owed_until_it_is_unwound(
        celery_app, rds, monkeypatch):
    """The child's start was taken for failed; the parent's undo found it
    RUNNING (WAITING, hold taken, ``ua`` set).  It completes, and Redis
    blips on the unwind its report sends: the report stays owed (it is
    cleared only after the unwind), so the sweep sends it again and the
    child is undone."""
    from celery_compensate.exceptions import SagaStoreUnavailable
    from celery_compensate.model import TaskIdInfo
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = started(store)
    store.step_done(child, 0, '"rb"')
    monkeypatch.setattr(coordinator, 'abort',
                        lambda *a, **k: None)   # the abort is slow
    coordinator.step_failed(TaskIdInfo('p', 1, False), 'publish failed')
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.undo_state(1)) == 'R'
    assert rds.hget(store.keys.saga(child), L.UNDO_FOR) == '1'
    monkeypatch.undo()
    real = store.unwind

    def blip(*a, **k):
        raise SagaStoreUnavailable('connection reset')

    monkeypatch.setattr(store, 'unwind', blip)
    coordinator.apply(child, store.step_done(child, 1, '"rc"'))  # COMPLETED
    monkeypatch.setattr(store, 'unwind', real)
    # the sweep must still undo it (or report it) later
    ckey = store.keys.saga(child)
    for sid in (child, 'p'):
        rds.zadd(store.keys.for_saga(sid)[1], {sid: 0})
        coordinator.recover(sid)
    assert (rds.hget(ckey, L.REPORT) is not None
            or store.get_state(child) is not SagaState.COMPLETED), (
        store.get_state(child), due_score(store, rds, child),
        rds.hget(parent, L.undo_state(1)), rds.hget(parent, L.held(1)),
        store.recover('p').status)


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_childs_late_failure_after_it_was_undone_fails_its_parent(
        celery_app, rds):
    """Before p ended (a's undo still running), its child is reopened by
    a late completer whose undo then spends its budget: the child is
    COMPENSATION_FAILED and reports it; p's undo of step 1, recorded D,
    is failed again, and p is COMPENSATION_FAILED, as a flat saga whose
    late undo failed."""
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = child_compensated_then_reported(store)
    assert rds.hget(store.keys.saga('p'), L.undo_state(0)) == 'Q'
    assert store.step_done(child, 1, '"rc"').status is Reply.LATE
    store.undo_failed(child, 1, 1, 'no', countdown=0)
    cf = store.undo_failed(child, 1, 2, 'no again', countdown=0)
    assert cf.new_state is SagaState.COMPENSATION_FAILED
    coordinator.settled(child, cf)
    end = store.undo_done('p', 0)
    assert end.new_state is not SagaState.COMPENSATED, (
        'p COMPENSATED while its child ' + str(store.get_state(child)))


def test_a_leftover_child_at_work_does_not_hold_a_new_parent(celery_app,
                                                            rds):
    """The earlier saga's child is still compensating (xp) when the new
    p's undo of its never-started child runs: it is not p's (``ptk``), so
    the undo is done at once, and no hold waits on a report that never
    comes."""
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = child_compensated_then_reported(store)
    assert store.step_done(child, 1, '"rc"').status is Reply.LATE
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    rds.delete(store.keys.saga('p'))        # the earlier root expired
    make(celery_app)                        # the id is reused
    store.step_done('p', 0, '"ra2"')
    coordinator.abort('p', 'customer cancelled')
    coordinator.nesting.start('p', parent_plan().steps[1], ['ra2'], {})  # ORPHAN
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.step_state(1)) == 'F'
    # the old child's late undo completes: it ends (expires: xp)
    coordinator.apply(child, store.undo_done(child, 1))
    assert rds.hget(parent, L.held(1)) is None
    assert rds.hget(parent, L.undo_state(1)) == 'D', (
        store.get_state('p'), rds.hget(parent, L.undo_state(1)),
        rds.hget(parent, L.held(1)), due_score(store, rds, 'p'))


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_root_reopened_by_its_childs_late_failure_ends_once_retried(
        celery_app, rds):
    """The child's CF report is owed (its reporter died) before its root
    ends; the root ends COMPENSATED (xp on the child); the sweep then
    delivers the report: the root is reopened COMPENSATION_FAILED.  The
    operator's retry re-drives the child (its parent waits for it again:
    ``xp`` dropped) and, once COMPENSATED, its report resumes the root."""
    store, child = reversed_parent(celery_app)
    ck = store.keys.saga(child)
    assert rds.hget(ck, L.REPORT)                   # owed, not sent
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    assert rds.hget(ck, 'xp') == '1'
    rds.hset(ck, L.REPORT_BY, f'{time.time() - 1:.3f}')
    assert store.recover(child).status is Reply.REPORT
    out = deliver(store, child)
    assert out.status is Reply.FAILED
    assert store.get_state('p') is SagaState.COMPENSATION_FAILED
    retried = store.retry('p')
    assert [(d.step.index, d.attempt) for d in retried.undos] == [(1, 2)]
    assert store.unwind('p', 1, 2).status is Reply.REDRIVEN
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    deliver(store, child)
    p = store.keys.saga('p')
    assert store.get_state('p') is SagaState.COMPENSATED, (
        store.get_state('p'), counters(rds, store, 'p'),
        rds.hget(p, L.held(1)), rds.hget(ck, L.REPORT), rds.ttl(ck),
        store.recover('p').status)


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_reopened_roots_child_retried_alone_then_the_root_ends(
        celery_app, rds):
    store, child = reversed_parent(celery_app)
    ck = store.keys.saga(child)
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    rds.hset(ck, L.REPORT_BY, f'{time.time() - 1:.3f}')
    assert store.recover(child).status is Reply.REPORT
    assert deliver(store, child).status is Reply.FAILED
    # the operator retries the child alone first, then the root
    assert store.retry(child).status is Reply.RETRIED
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    deliver(store, child)
    # then the root
    store.retry('p')
    un = store.unwind('p', 1, 2)
    deliver(store, child)
    p = store.keys.saga('p')
    assert store.get_state('p') is SagaState.COMPENSATED, (
        un.status, store.get_state('p'), counters(rds, store, 'p'),
        rds.hget(p, L.held(1)), rds.hget(ck, L.REPORT))


def test_a_leftover_child_at_work_is_not_replaced(celery_app, rds):
    """A leftover child at work (its late undo running on a worker) is not
    replaced by a new saga with the same id (BUSY: the new step fails);
    the old worker's outcome lands on the leftover it belongs to."""
    store = make(celery_app)
    child = child_compensated_then_reported(store)
    late = store.step_done(child, 1, '"rc"')
    assert [(d.step.index, d.attempt) for d in late.undos] == [(1, 1)]
    assert store.undo_begin(child, 1, 1, 'old-worker') is Reply.RUN
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    rds.delete(store.keys.saga('p'))            # the root's ttl ran out
    make(celery_app)
    store.step_done('p', 0, '"ra2"')
    assert store.start(child, child_plan(), parent=('p', 1)) is Reply.BUSY
    coordinator = get_state(celery_app).coordinator
    coordinator.nesting.start('p', parent_plan().steps[1], ['ra2'], {})
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.step_state(1)) == 'F'
    assert 'still at work' in rds.hget(parent, L.failure(1))
    old = store.undo_done(child, 1, 'old-worker-done')
    assert old.status is Reply.UNDONE
    assert old.new_state is SagaState.COMPENSATED


# -- resends and late calls that answer as they should ---------------------

@pytest.mark.compensate_conf(compensate_result_max_bytes=64)
def test_a_too_large_report_resent_by_the_sweep_answers_the_same(
        celery_app, rds, monkeypatch):
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = started(store)
    store.step_done(child, 0, '"rb"')
    store.step_done(child, 1, '"' + 'x' * 100 + '"')
    # the reporter dies right after the parent's step_failed
    monkeypatch.setattr(coordinator, 'apply', lambda *a, **k: None)
    monkeypatch.setattr(store, 'reported', lambda *a, **k: None)
    coordinator.nesting.report(child)
    monkeypatch.undo()
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.step_state(1)) == 'F'
    assert rds.hget(parent, L.undo_state(1)) == 'Q'
    ckey = store.keys.saga(child)
    rds.hset(ckey, L.REPORT_BY, f'{time.time() - 1:.3f}')
    assert coordinator.recover(child).status is Reply.REPORT
    assert store.get_state(child) is SagaState.COMPENSATING
    assert rds.hget(parent, L.undo_state(1)) == 'R'
    assert rds.hget(ckey, L.REPORT) is None
    assert rds.hget(ckey, L.UNDO_FOR) == '1'


def test_a_late_confirm_of_a_first_stage_published_again_changes_nothing(
        celery_app, rds):
    store = make(celery_app)
    child = started(store)
    ckey = store.keys.saga(child)
    rds.hset(ckey, L.deadline(0), f'{time.time() - 1:.3f}')
    assert store.recover(child).status is Reply.RECOVERED
    assert rds.hget(ckey, L.generation(0)) == '2'     # published again
    d = rds.hget(ckey, L.deadline(0))
    assert store.confirm_first_stage(child) is Reply.GONE
    assert rds.hget(ckey, L.deadline(0)) == d


def test_an_unwind_resent_after_its_report_answers_the_same(celery_app, rds):
    store = make(celery_app)
    child = started(store)
    store.step_done(child, 0, '"rb"')
    store.step_failed(child, 1, 'c failed')
    assert store.undo_done(child, 0).new_state is SagaState.COMPENSATED
    rep = store.report(child)
    store.step_failed('p', 1, 'child compensated', token=rep.token)
    store.reported(child, rep.token)
    assert store.unwind('p', 1, 1, 'same').status is Reply.REPORT
    t1 = store.report(child).token
    assert store.unwind('p', 1, 1, 'same').status is Reply.REPORT
    assert store.report(child).token == t1


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_an_old_undone_report_resent_after_the_childs_late_failure_is_stale(
        celery_app, rds):
    """The sweep sent the child's COMPENSATED report (its reporter stalled
    longer than the step lease); the child then fails late, which turns
    the parent's undo back to F; the stalled reporter's resend of the old
    report finally arrives: stale, the undo stays F."""
    store = make(celery_app)
    child = started(store)
    store.step_done(child, 0, '"rb"')
    store.step_failed(child, 1, 'lost')
    store.undo_done(child, 0)
    rep = store.report(child)
    store.step_failed('p', 1, 'child compensated', token=rep.token)
    store.reported(child, rep.token)
    assert store.unwind('p', 1, 1, 'u1').status is Reply.REPORT
    t1 = store.report(child).token
    assert store.undo_done('p', 1, t1).status is Reply.UNDONE   # the sweep
    store.reported(child, t1)
    assert store.step_done(child, 1, '"rc"').status is Reply.LATE
    store.undo_failed(child, 1, 1, 'no', countdown=0)
    store.undo_failed(child, 1, 2, 'no', countdown=0)
    assert deliver(store, child).status is Reply.FAILED
    slow = store.undo_done('p', 1, t1)      # the stalled first reporter
    assert slow.status is Reply.DUPLICATE
    assert rds.hget(store.keys.saga('p'), L.undo_state(1)) == 'F'
    # the operator's retry still works through it
    store.retry('p')
    assert store.unwind('p', 1, 2).status is Reply.REDRIVEN
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    assert deliver(store, child).status is Reply.UNDONE
