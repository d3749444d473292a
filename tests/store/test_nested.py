"""Nested sagas in the store, event by event, with the faults between the
library's own actions: the child's start takes its step in the parent
atomically (or is refused as an orphan), a settled child owes its parent
a report that survives its reporter dying, and the parent's undo of a
completed child is the child's own compensation."""
from __future__ import annotations

import time

import pytest

from celery_compensate import SagaState
from celery_compensate.appstate import get_state
from celery_compensate.store import Reply
from celery_compensate.store import layout as L

from .nested import (
    child_plan, complete_child, deliver, lapse, make, parallel, started,
)

def test_the_childs_start_takes_its_step_in_the_parent(celery_app, rds):
    store = make(celery_app)
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.KIDS) == '1'
    store.step_done('p', 0, '"ra"')
    assert rds.hget(parent, L.outbox(1)) == '1'
    assert rds.hget(parent, L.deadline(1)) is not None
    assert store.start('p~1', child_plan(), parent=('p', 1)) is Reply.CREATED
    # held by the child: no lease of its own, out of the outbox
    assert rds.hget(parent, L.held(1)) == L.CHILD_HOLDS
    assert rds.hget(parent, L.deadline(1)) is None
    assert rds.hget(parent, L.outbox(1)) is None
    ckey = store.keys.saga('p~1')
    # the child's first stage is in its outbox: its starter may die
    assert rds.hget(ckey, L.outbox(0)) == '1'
    assert rds.hget(ckey, L.UP) == '1'
    # the same shard: one Redis Cluster slot
    assert store.keys.for_saga('p~1')[1] == store.keys.for_saga('p')[1]
    # a resent start (the sweep published the step again) changes nothing
    assert store.start('p~1', child_plan(), parent=('p', 1)) is Reply.EXISTS
    # the sweep leaves the held step alone, and does not quarantine the
    # parent for having nothing with a deadline
    assert store.recover('p').status is Reply.RECOVERED


def test_a_child_started_after_its_parent_gave_up_is_an_orphan(celery_app,
                                                                rds):
    store = make(celery_app)
    store.step_done('p', 0, '"ra"')
    store.step_failed('p', 1, 'lost before the child started')
    assert store.start('p~1', child_plan(), parent=('p', 1)) is Reply.ORPHAN
    assert not rds.exists(store.keys.saga('p~1'))


def test_a_settled_child_owes_its_parent_a_report(celery_app, rds):
    store = make(celery_app)
    child = started(store)
    ckey = store.keys.saga(child)
    store.step_done(child, 0, '"rb"')
    done = store.step_done(child, 1, '"rc"')
    assert done.status is Reply.COMPLETED
    token = rds.hget(ckey, L.REPORT)
    assert token
    # kept (its parent may undo it), and in :due until it has reported
    assert rds.ttl(ckey) == -1
    assert rds.zscore(store.keys.for_saga(child)[1], child) is not None
    rep = store.report(child)
    assert rep.state is SagaState.COMPLETED and rep.index == 1
    assert rep.results == ['rc'] and rep.token == token
    assert rep.undo_for is None
    # the report is the parent's step_done with the report's token: a
    # resend answers like the first call
    first = store.step_done('p', 1, '"rc"', token)
    assert first.status is Reply.NEXT
    again = store.step_done('p', 1, '"rc"', token)
    assert again.status is Reply.NEXT and [s.index for s in again.forward] \
        == [2]
    assert store.reported(child, token) is Reply.REPORTED
    assert store.reported(child, token) is Reply.GONE
    assert rds.zscore(store.keys.for_saga(child)[1], child) is None


def test_the_sweep_sends_a_report_whose_reporter_died(celery_app, rds):
    store = make(celery_app)
    child = started(store)
    ckey = store.keys.saga(child)
    store.step_done(child, 0, '"rb"')
    store.step_done(child, 1, '"rc"')       # its reporter dies here
    assert store.recover(child).status is not Reply.REPORT   # not yet due
    rds.hset(ckey, L.REPORT_BY, f'{time.time() - 1:.3f}')
    coordinator = get_state(celery_app).coordinator
    outcome = coordinator.recover(child)
    assert outcome.status is Reply.REPORT
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.step_state(1)) == 'D'
    assert rds.hget(parent, L.result(1)) == '"rc"'
    assert rds.hget(ckey, L.REPORT) is None


def test_unwind_compensates_a_completed_child_as_a_unit(celery_app, rds):
    store = make(celery_app)
    child = started(store)
    complete_child(store, child)
    assert deliver(store, child).status is Reply.NEXT
    failed = store.step_failed('p', 2, 'd failed')
    assert failed.status is Reply.CLAIMED
    # stage 2 (d) had nothing to undo: the child's undo is due
    assert [(d.step.index, d.attempt) for d in failed.undos] == [(1, 1)]
    out = store.unwind('p', 1, 1, 'tok-1')
    assert out.status is Reply.UNWINDING
    assert out.old_state is SagaState.COMPLETED
    assert out.new_state is SagaState.COMPENSATING
    assert [d.step.index for d in out.undos] == [1]     # c first
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.undo_state(1)) == 'R'
    assert rds.hget(parent, L.held(1)) == L.CHILD_HOLDS
    assert rds.hget(parent, L.deadline(1)) is None
    # resent: the same undos again
    again = store.unwind('p', 1, 1, 'tok-1')
    assert again.status is Reply.UNWINDING
    assert [d.step.index for d in again.undos] == [1]
    # another attempt number is stale
    assert store.unwind('p', 1, 2, 'tok-2').status is Reply.STALE
    store.undo_done(child, 1)
    last = store.undo_done(child, 0)
    assert last.new_state is SagaState.COMPENSATED
    rep = store.report(child)
    assert rep.state is SagaState.COMPENSATED and rep.undo_for == 1
    done = store.undo_done('p', 1, rep.token)
    assert done.status is Reply.UNDONE
    assert [d.step.index for d in done.undos] == [0]    # then a


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_failed_child_redriven_by_the_parents_retry(celery_app, rds):
    store = make(celery_app)
    child = started(store)
    store.step_done(child, 0, '"rb"')
    store.step_failed(child, 1, 'c failed')       # the child compensates b
    store.undo_failed(child, 0, 1, 'no', countdown=0)
    cf = store.undo_failed(child, 0, 2, 'no again', countdown=0)
    assert cf.new_state is SagaState.COMPENSATION_FAILED
    rep = store.report(child)
    assert rep.state is SagaState.COMPENSATION_FAILED and rep.undo_for is None
    claimed = store.step_failed('p', 1, 'child failed', token=rep.token)
    store.reported(child, rep.token)
    # a failed child is undone too (it is its own compensation): attempt 1
    # finds it COMPENSATION_FAILED and reports it
    assert [(d.step.index, d.attempt) for d in claimed.undos] == [(1, 1)]
    assert store.unwind('p', 1, 1).status is Reply.REPORT
    rep = store.report(child)
    assert rep.undo_for == 1
    failed = store.undo_failed('p', 1, 1, 'child CF', final=True,
                               token=rep.token)
    assert failed.new_state is SagaState.COMPENSATION_FAILED
    store.reported(child, rep.token)
    # the operator's retry of the parent: attempt 2 re-drives the child
    retried = store.retry('p')
    assert [(d.step.index, d.attempt) for d in retried.undos] == [(1, 2)]
    out = store.unwind('p', 1, 2)
    assert out.status is Reply.REDRIVEN
    assert out.new_state is SagaState.COMPENSATING
    assert [(d.step.index, d.attempt) for d in out.undos] == [(0, 3)]


def test_abort_hands_the_held_steps_to_the_caller(celery_app, rds):
    store = make(celery_app)
    started(store)
    out = store.abort('p', 'stop')
    assert out.status is Reply.ABORTED
    assert out.stopped == [] and out.children == [1]
    # the held step waits for its child's report: the parent does not
    # move on without it
    assert rds.hget(store.keys.saga('p'), L.step_state(1)) == 'R'
    assert out.new_state is SagaState.COMPENSATING


def test_the_root_expires_its_whole_tree(celery_app, rds):
    store = make(celery_app)
    child = started(store)
    complete_child(store, child)
    assert deliver(store, child).status is Reply.NEXT
    assert rds.ttl(store.keys.saga(child)) == -1
    assert store.step_done('p', 2, '"rd"').status is Reply.COMPLETED
    assert rds.ttl(store.keys.saga(child)) > 0
    assert rds.zscore(store.keys.for_saga(child)[3], child) is not None


def test_a_child_is_not_forgotten_before_its_outermost_saga_ends(celery_app,
                                                                 rds):
    store = make(celery_app)
    child = started(store)
    store.step_done(child, 0, '"rb"')
    store.step_done(child, 1, '"rc"')
    # COMPLETED, but its parent may still undo it as a unit
    assert store.forget(child) == (Reply.NOT_FINISHED, SagaState.COMPLETED)
    rep = store.report(child)
    store.step_done('p', 1, '"rc"', rep.token)
    store.step_done('p', 2, '"rd"')
    assert store.forget(child) == (Reply.FORGOTTEN, SagaState.COMPLETED)


def test_a_child_whose_start_was_taken_for_failed_is_stopped_and_undone(
        celery_app, rds):
    """The start's reply was lost (Redis hiccup): its caller records the
    step failed, yet the child exists and runs.  The parent's undo of it
    aborts it; once it has compensated, the parent goes on."""
    from celery_compensate.model import TaskIdInfo
    store = make(celery_app)
    child = started(store)
    coordinator = get_state(celery_app).coordinator
    coordinator.step_failed(TaskIdInfo('p', 1, False), 'publish failed')
    assert store.get_state(child) is SagaState.COMPENSATING
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.undo_state(1)) == 'R'
    # its step b, never received, is given up after the abort's grace
    lapse(rds, store, child, 0)
    coordinator.recover(child)
    assert store.get_state(child) is SagaState.COMPENSATED
    assert rds.hget(parent, L.undo_state(1)) == 'D'
    # then a's undo is due (here its publishing is refused: the plan's
    # t.a is no task of this app, so its undo's call does not fit)
    assert rds.hget(parent, L.attempt(0)) is not None
    assert rds.hget(store.keys.saga(child), L.REPORT) is None


def test_a_child_taken_for_failed_that_completes_is_undone_as_a_unit(
        celery_app, rds):
    from celery_compensate.model import TaskIdInfo
    store = make(celery_app)
    child = started(store)
    coordinator = get_state(celery_app).coordinator
    store.step_done(child, 0, '"rb"')
    # the parent's undo finds it running and aborts it; c completes anyway
    coordinator.step_failed(TaskIdInfo('p', 1, False), 'publish failed')
    assert store.get_state(child) is SagaState.COMPENSATING
    out = store.step_done(child, 1, '"rc"')
    assert out.status is Reply.LATE
    coordinator.apply(child, out)
    ckey = store.keys.saga(child)
    assert rds.hget(ckey, L.undo_state(1)) == 'Q'        # c first
    store.undo_done(child, 1)
    coordinator.apply(child, store.undo_done(child, 0))
    assert store.get_state(child) is SagaState.COMPENSATED
    parent = store.keys.saga('p')
    assert rds.hget(parent, L.undo_state(1)) == 'D'


def test_a_sibling_fails_while_the_child_runs(celery_app, rds):
    """The child runs on, completes late, and is undone as a unit before
    the parent's earlier step."""
    store = parallel(celery_app)
    assert store.step_failed('q', 2, 'y failed').status is Reply.CLAIMED
    assert store.recover('q').status is Reply.RECOVERED     # not stuck
    store.step_done('q~1', 0, '"rb"')
    store.step_done('q~1', 1, '"rc"')
    rep = store.report('q~1')
    late = store.step_done('q', 1, '"rc"', rep.token)
    assert late.status is Reply.LATE
    assert [(d.step.index, d.attempt) for d in late.undos] == [(1, 1)]
    store.reported('q~1', rep.token)
    out = store.unwind('q', 1, 1, 'u')
    assert out.status is Reply.UNWINDING and [d.step.index for d in
                                              out.undos] == [1]
    # a is not due before the child compensated
    assert rds.hget(store.keys.saga('q'), L.undo_state(0)) is None
    store.undo_done('q~1', 1)
    assert store.undo_done('q~1', 0).new_state is SagaState.COMPENSATED
    rep = store.report('q~1')
    done = store.undo_done('q', 1, rep.token)
    assert [d.step.index for d in done.undos] == [0]


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_child_repaired_alone_resumes_its_parent(celery_app, rds):
    """A COMPENSATION_FAILED child retried on its own: once COMPENSATED its
    report resumes the parent (no other undo of the parent failed)."""
    store = make(celery_app)
    child = started(store)
    complete_child(store, child)
    assert deliver(store, child).status is Reply.NEXT
    store.step_failed('p', 2, 'd failed')
    store.unwind('p', 1, 1, 'u')
    store.undo_done(child, 1)
    store.undo_failed(child, 0, 1, 'no', countdown=0)
    assert store.undo_failed(child, 0, 2, 'no', countdown=0).new_state \
        is SagaState.COMPENSATION_FAILED
    rep = store.report(child)
    assert store.undo_failed('p', 1, 1, 'cf', final=True,
                             token=rep.token).new_state \
        is SagaState.COMPENSATION_FAILED
    store.reported(child, rep.token)
    store.retry(child)
    assert store.undo_done(child, 0).new_state is SagaState.COMPENSATED
    rep = store.report(child)
    assert rep.undo_for == 1
    out = store.undo_done('p', 1, rep.token)
    assert out.new_state is SagaState.COMPENSATING
    assert [d.step.index for d in out.undos] == [0]
