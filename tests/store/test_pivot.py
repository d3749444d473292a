"""Pivot steps (``compensate_pivot``) in the store, event by event: past
a completed pivot a failed or lost step is published again, never given up
to compensation; its attempts spent, the saga is FORWARD_FAILED until an
operator's retry."""
from __future__ import annotations

import pytest

from celery_compensate import SagaState
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef, UndoSpec
from celery_compensate.store import Reply, SagaStore
from celery_compensate.store import layout as L


def make(celery_app, sid: str = 's') -> SagaStore:
    """a (undoable) -> pivot -> c1 | c2 (parallel, no undo) -> d."""
    store = get_state(celery_app).store
    undo = UndoSpec('t.undo')
    plan = Plan.from_stages([
        [(TaskRef('t.a'), undo, False)],
        [(TaskRef('t.pivot'), undo, False, None, None, 0.0, True)],
        [(TaskRef('t.c1'), None, False), (TaskRef('t.c2'), None, False)],
        [(TaskRef('t.d'), None, False)],
    ])
    assert store.create(sid, plan)
    return store


def passed(store: SagaStore, sid: str = 's') -> None:
    store.step_done(sid, 0, '"ra"')
    assert store.step_done(sid, 1, '"rp"').status is Reply.NEXT


@pytest.mark.compensate_conf(compensate_forward_max_attempts=3,
                             compensate_undo_retry_backoff=0.5,
                             compensate_undo_retry_backoff_max=0.75)
def test_a_failure_past_the_pivot_publishes_the_step_again(celery_app, rds):
    store = make(celery_app)
    passed(store)
    key = store.keys.saga('s')
    first = store.step_failed('s', 2, 'boom', generation=1)
    assert first.status is Reply.FORWARD_RETRY
    assert first.new_state is SagaState.RUNNING and first.undos == []
    assert [s.index for s in first.forward] == [2]
    assert first.generations == {2: 2} and first.countdowns == {2: 0.5}
    assert first.results == ['rp']          # what c1 is called with
    # the copy that failed reports again: nothing more
    assert store.step_failed('s', 2, 'boom', generation=1).status \
        is Reply.STALE_COPY
    second = store.step_failed('s', 2, 'boom again', generation=2)
    assert second.countdowns == {2: 0.75}   # doubled, capped
    spent = store.step_failed('s', 2, 'boom at last', generation=3)
    assert spent.status is Reply.FORWARD_FAILED
    assert spent.new_state is SagaState.FORWARD_FAILED
    assert rds.hget(key, L.REASON) == 'boom at last'
    assert rds.hget(key, L.step_state(2)) == 'F'
    # nothing was undone, nothing is in flight for the sweep
    assert rds.hget(key, L.undo_state(0)) is None
    assert store.recover('s').status is Reply.INACTIVE
    # the sibling still completes; the saga stays FORWARD_FAILED
    assert store.step_done('s', 3, '"r2"').status is Reply.LATE
    assert store.get_state('s') is SagaState.FORWARD_FAILED


@pytest.mark.compensate_conf(compensate_forward_max_attempts=2)
def test_an_operators_retry_drives_a_forward_failed_saga_forward(
        celery_app, rds):
    store = make(celery_app)
    passed(store)
    store.step_done('s', 3, '"r2"')
    store.step_failed('s', 2, 'e1', generation=1)
    assert store.step_failed('s', 2, 'e2', generation=2).status \
        is Reply.FORWARD_FAILED
    retried = store.retry('s', 'op-1')
    assert retried.status is Reply.RETRIED
    assert (retried.old_state, retried.new_state) == (
        SagaState.FORWARD_FAILED, SagaState.RUNNING)
    assert [s.index for s in retried.forward] == [2]
    assert retried.generations == {2: 3} and retried.results == ['rp']
    # a fresh budget: the next failure is retried, not final
    assert store.step_failed('s', 2, 'e3', generation=3).status \
        is Reply.FORWARD_RETRY
    done = store.step_done('s', 2, '"r1"')
    assert done.status is Reply.NEXT and [s.index for s in done.forward] == [4]
    assert store.step_done('s', 4, '"rd"').status is Reply.COMPLETED


def test_before_the_pivot_completed_a_failure_compensates(celery_app, rds):
    store = make(celery_app)
    store.step_done('s', 0, '"ra"')
    failed = store.step_failed('s', 1, 'pivot failed')
    assert failed.status is Reply.CLAIMED
    assert [d.step.index for d in failed.undos] == [0]


def test_an_abort_past_the_pivot_changes_nothing(celery_app, rds):
    store = make(celery_app)
    store.step_done('s', 0, '"ra"')
    before = store.abort('s', 'aborted: early', 'tok-early')
    assert before.status is Reply.ABORTED
    other = make(celery_app, 't')
    passed(other, 't')
    late = other.abort('t', 'aborted: late')
    assert late.status is Reply.PAST_PIVOT
    assert other.get_state('t') is SagaState.RUNNING


@pytest.mark.compensate_conf(compensate_step_timeout=1.0,
                             compensate_queue_timeout=1.0,
                             compensate_heartbeat_interval=0.25,
                             compensate_recovery_interval=0.25,
                             compensate_undo_retry_backoff=0.05)
def test_a_step_lost_past_the_pivot_is_published_again(celery_app, rds):
    store = make(celery_app)
    passed(store)
    key = store.keys.saga('s')
    # a worker received c1 (out of the outbox, held), then died: its lease
    # lapsed, nobody renewed it
    rds.hset(key, L.held(2), 'holder-1')
    rds.hdel(key, L.outbox(2))
    rds.hset(key, L.deadline(2), 1)
    outcome = store.recover('s')
    assert outcome.status is Reply.RECOVERED and outcome.stopped == []
    assert [s.index for s in outcome.forward] == [2]
    assert outcome.countdowns == {2: 0.05} and outcome.generations == {2: 2}
    assert outcome.results == ['rp'] and outcome.undos == []
    assert store.get_state('s') is SagaState.RUNNING
    assert rds.hget(key, L.step_state(2)) == 'R'


@pytest.mark.compensate_conf(compensate_forward_max_attempts=2)
def test_the_step_that_failed_forward_completing_after_all_resumes(
        celery_app, rds):
    """A copy taken for lost completes after the saga became
    FORWARD_FAILED: the saga goes forward again by itself, once no member
    of the stage failed."""
    store = make(celery_app)
    passed(store)
    store.step_failed('s', 2, 'e1', generation=1)
    store.step_failed('s', 2, 'e2', generation=2)
    store.step_failed('s', 3, 'e1', generation=1)
    store.step_failed('s', 3, 'e2', generation=2)
    assert store.get_state('s') is SagaState.FORWARD_FAILED
    late = store.step_done('s', 2, '"r1"')
    assert late.status is Reply.LATE        # c2 failed too: still waits
    assert store.get_state('s') is SagaState.FORWARD_FAILED
    resumed = store.step_done('s', 3, '"r2"')
    assert resumed.status is Reply.NEXT
    assert (resumed.old_state, resumed.new_state) == (
        SagaState.FORWARD_FAILED, SagaState.RUNNING)
    assert [s.index for s in resumed.forward] == [4]
    assert store.step_done('s', 4, '"rd"').status is Reply.COMPLETED
