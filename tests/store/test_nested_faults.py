"""Nested sagas against the faults an adversarial review placed between
the library's own actions (each test failed before its fix): a start
whose reply is lost, an unwind's caller that dies, ``forget`` of a root or
a child, a child's late completer around its root's end, and a child step
published again after its parent stopped running."""
from __future__ import annotations

import time

import pytest

from celery_compensate import SagaNotFinished, SagaResult, SagaState
from celery_compensate.appstate import get_state
from celery_compensate.exceptions import SagaStoreUnavailable
from celery_compensate.model import Plan, TaskIdInfo, TaskRef
from celery_compensate.store import Reply
from celery_compensate.store import layout as L

from .nested import (
    UNDO, child_compensated_then_reported, child_plan, complete_child,
    due_score, lapse, make, parallel, started,
)



def test_a_start_whose_reply_was_lost_is_sent_again_with_its_token(
        celery_app, rds, monkeypatch):
    """start.lua ran, its reply was lost: the resend (same token) answers
    ``created``, so the step is held by its child, not taken for failed."""
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    real = store.start
    calls = []

    def reply_lost_once(*args, **kwargs):
        calls.append(kwargs.get('token'))
        reply = real(*args, **kwargs)
        if len(calls) == 1:
            raise SagaStoreUnavailable('reply lost (socket timeout)')
        return reply

    monkeypatch.setattr(store, 'start', reply_lost_once)
    coordinator.step_done(TaskIdInfo('p', 0, False), 'ra')
    monkeypatch.setattr(store, 'start', real)
    assert len(calls) == 2 and calls[0] == calls[1] and calls[0]
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.STATE) == 'RUNNING'
    assert rds.hget(parent, L.step_state(1)) == 'R'
    assert rds.hget(parent, L.held(1)) == L.CHILD_HOLDS
    assert rds.hget(store.keys.saga('p~1'), L.STATE) == 'RUNNING'


def test_an_unwind_of_a_child_never_started_keeps_the_undos_lease(
        celery_app, rds):
    """Unwind answered GONE and its caller died before recording the undo
    done: the undo was not held, so its lease sends it again."""
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    store.step_done('p', 0, '"ra"')
    claimed = store.step_failed('p', 1, 'lost before the child started')
    assert [(d.step.index, d.attempt) for d in claimed.undos] == [(1, 1)]
    assert store.start('p~1', child_plan(), parent=('p', 1)) is Reply.ORPHAN
    assert store.unwind('p', 1, 1, 'tok').status is Reply.GONE
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.undo_state(1)) == 'Q'
    assert rds.hget(parent, L.held(1)) is None
    lapse(rds, store, 'p', 1)
    coordinator.recover('p')
    assert rds.hget(parent, L.undo_state(1)) == 'D'


def test_forget_of_a_child_its_parent_may_still_undo_is_refused(celery_app,
                                                                rds):
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = started(store)
    complete_child(store)                  # its reporter dies here
    with pytest.raises(SagaNotFinished, match='nested saga'):
        SagaResult(child, app=celery_app).forget()
    coordinator.settled(child, store.step_done(child, 1, '"rc"'))
    with pytest.raises(SagaNotFinished, match='nested saga'):
        SagaResult(child, app=celery_app).forget()
    assert rds.hget(store.keys.saga('p'), L.step_state(1)) == 'D'


def test_forget_of_a_root_deletes_its_children(celery_app, rds):
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = started(store)
    coordinator.settled(child, complete_child(store))
    assert store.step_done('p', 2, '"rd"').status is Reply.COMPLETED
    SagaResult('p', app=celery_app).forget()
    assert not rds.exists(store.keys.saga(child))
    assert rds.zscore(store.keys.for_saga(child)[4], child) is None


def test_a_child_left_by_an_earlier_saga_with_the_same_id_is_replaced(
        celery_app, rds):
    """The root expired (or was deleted) before a child it kept: a new saga
    with the same id starts its own child, and never undoes the old one."""
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = started(store)
    coordinator.settled(child, complete_child(store))
    rds.delete(store.keys.saga('p'))        # as if expired first
    make(celery_app)                        # the id is reused
    store.step_done('p', 0, '"ra2"')
    assert store.start(child, child_plan(), parent=('p', 1)) is Reply.CREATED
    ckey = store.keys.saga(child)
    assert rds.hget(ckey, L.STATE) == 'RUNNING'
    assert rds.hget(ckey, L.step_state(1)) == 'P'
    assert rds.hget(store.keys.saga('p'), L.held(1)) == L.CHILD_HOLDS
    # the same parent starting it again finds its own child
    assert store.start(child, child_plan(), parent=('p', 1)) is Reply.EXISTS


def test_a_child_still_compensating_when_its_root_ends_is_kept(celery_app,
                                                               rds):
    store = make(celery_app)
    child = child_compensated_then_reported(store)
    ckey = store.keys.saga(child)
    # c completes after all: the child undoes it, out of order
    late = store.step_done(child, 1, '"rc"')
    assert late.new_state is SagaState.COMPENSATING
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    # the root ended: the child at work is kept, in :due, and expires once
    # it ends
    assert rds.ttl(ckey) == -1 and due_score(store, rds, child) is not None
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    assert rds.ttl(ckey) > 0
    assert due_score(store, rds, child) is None
    assert rds.hget(ckey, L.REPORT) is None     # nobody to report to


def test_a_childs_late_completer_after_its_root_ended_expires(celery_app,
                                                              rds):
    store = make(celery_app)
    child = child_compensated_then_reported(store)
    ckey = store.keys.saga(child)
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    assert rds.ttl(ckey) > 0                    # expires with its root
    late = store.step_done(child, 1, '"rc"')
    assert late.status is Reply.LATE
    assert rds.ttl(ckey) == -1                  # at work again: kept
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    assert rds.ttl(ckey) > 0
    assert rds.zscore(store.keys.for_saga(child)[3], child) is not None


def test_a_child_step_published_again_after_its_parent_stopped_settles(
        celery_app, rds):
    """The publisher of [y, child] died after sending y; y failed.  The
    sweep publishes the child's step again; its start is refused as an
    orphan, and the step fails at once instead of waiting a queue
    timeout."""
    store = get_state(celery_app).store
    coordinator = get_state(celery_app).coordinator
    plan = Plan.from_stages([
        [(TaskRef('t.a'), UNDO, False)],
        [(TaskRef('t.y'), UNDO, False),
         (TaskRef('celery_compensate.saga'), None, False, None, None, 0.0,
          False, child_plan())],
    ])
    assert store.create('q', plan)
    assert store.step_done('q', 0, '"ra"').status is Reply.NEXT
    assert store.step_failed('q', 1, 'y failed').status is Reply.CLAIMED
    key = store.keys.saga('q')
    lapse(rds, store, 'q', 2)
    coordinator.recover('q')                    # start: ORPHAN
    assert not rds.exists(store.keys.saga('q~2'))
    assert rds.hget(key, L.step_state(2)) == 'F'
    assert 'no longer runs' in rds.hget(key, L.failure(2))


def test_a_settled_childs_hold_does_not_hide_a_damaged_record(celery_app,
                                                              rds):
    """A completed child's step keeps its ``~`` marker: the sweep still
    quarantines a record with nothing in flight (here: a sibling's lease
    lost), instead of taking it for waiting on that child."""
    store = parallel(celery_app)
    complete_child(store, 'q~1')
    rep = store.report('q~1')
    assert store.step_done('q', 1, '"rc"', rep.token).status is Reply.RECORDED
    rds.hdel(store.keys.saga('q'), L.deadline(2))       # damaged
    assert store.recover('q').status is Reply.STUCK


def test_the_childs_first_stage_leaves_its_outbox_once_published(celery_app,
                                                                 rds):
    """Its starter confirms the publish: a backlog longer than the step
    lease does not make the sweep publish it again (the queue lease)."""
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    coordinator.step_done(TaskIdInfo('p', 0, False), 'ra')
    ckey = store.keys.saga('p~1')
    assert rds.hget(ckey, L.STATE) == 'RUNNING'
    assert rds.hget(ckey, L.outbox(0)) is None
    left = float(rds.hget(ckey, L.deadline(0))) - time.time()
    assert left > store.settings.queue_timeout - 5


@pytest.mark.compensate_conf(compensate_result_max_bytes=64)
def test_a_childs_result_too_large_for_its_parent_undoes_it(celery_app, rds):
    store = make(celery_app)
    coordinator = get_state(celery_app).coordinator
    child = started(store)
    store.step_done(child, 0, '"rb"')
    big = '"' + 'x' * 100 + '"'
    coordinator.settled(child, store.step_done(child, 1, big))
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.step_state(1)) == 'F'
    assert 'ResultTooLarge' in rds.hget(parent, L.failure(1))
    # it took effect: undone as a unit
    assert store.get_state(child) is SagaState.COMPENSATING
    assert rds.hget(parent, L.undo_state(1)) == 'R'
