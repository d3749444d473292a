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


# -- which copy failed (found by the review of the first version) -----------

@pytest.mark.compensate_conf(compensate_forward_max_attempts=2)
def test_a_second_report_of_one_failure_is_stale_after_the_new_copy_held(
        celery_app, rds):
    """A hard time limit is told twice from the main process, without a
    generation; by the second, the copy published again (its id carries
    generation 2) may be held already: still one attempt."""
    store = make(celery_app)
    passed(store)
    assert store.receive('s', 2, None, 1, 'holder-1') is Reply.HELD
    first = store.step_failed('s', 2, 'TimeLimitExceeded(5)')
    assert first.status is Reply.FORWARD_RETRY and first.generations == {2: 2}
    assert store.receive('s', 2, None, 2, 'holder-2') is Reply.HELD
    assert store.step_failed('s', 2, 'TimeLimitExceeded(5)').status \
        is Reply.STALE_COPY
    assert store.get_state('s') is SagaState.RUNNING


def test_the_loss_of_an_old_copy_leaves_the_running_one_alone(celery_app,
                                                              rds):
    store = make(celery_app)
    passed(store)
    key = store.keys.saga('s')
    assert store.receive('s', 2, None, 1, 'holder-1') is Reply.HELD
    rds.hset(key, L.deadline(2), 1)               # its worker stalled
    assert store.recover('s').generations == {2: 2}
    assert store.receive('s', 2, None, 2, 'holder-2') is Reply.HELD
    # copy 1's pool child dies after all: WorkerLostError, no generation
    assert store.step_failed('s', 2, 'WorkerLostError').status \
        is Reply.STALE_COPY
    assert rds.hget(key, L.held(2)) == 'holder-2'
    assert rds.hget(key, L.generation(2)) == '2'


def test_the_failure_of_the_new_copy_counts_before_its_receipt(celery_app,
                                                               rds):
    """The copy published again is revoked (or unknown) before its
    receipt is recorded: its task id says it is the current copy, so the
    failure counts (it was once taken for stale, leaving the saga to the
    queue timeout)."""
    store = make(celery_app)
    passed(store)
    assert store.step_failed('s', 2, 'e1', generation=1).status \
        is Reply.FORWARD_RETRY
    again = store.step_failed('s', 2, "task 't.c1' is not registered",
                              generation=2)
    assert again.status is Reply.FORWARD_RETRY and again.generations == {2: 3}


def test_a_revoked_step_past_the_pivot_is_not_tried_again(celery_app, rds):
    store = make(celery_app)
    passed(store)
    stopped = store.step_failed('s', 2, 'revoked', stopped=True)
    assert stopped.status is Reply.FORWARD_FAILED
    assert store.get_state('s') is SagaState.FORWARD_FAILED
    retried = store.retry('s', 'op-1')
    assert retried.generations == {2: 2}
    assert store.read('s').steps[2].task_id == 's.s2.2'
    assert store.read('s').reason is None       # running again


@pytest.mark.compensate_conf(compensate_forward_max_attempts=2)
def test_a_resent_forward_retry_publishes_like_the_first(celery_app, rds):
    """redis-py resends a retry whose reply was lost (same token): its
    caller published nothing, so the answer names the steps again."""
    store = make(celery_app)
    passed(store)
    store.step_done('s', 3, '"r2"')
    store.step_failed('s', 2, 'e1', generation=1)
    store.step_failed('s', 2, 'e2', generation=2)
    first = store.retry('s', 'op-1')
    again = store.retry('s', 'op-1')
    assert (again.status, again.old_state, again.new_state) == (
        Reply.RETRIED, SagaState.FORWARD_FAILED, SagaState.RUNNING)
    assert [s.index for s in again.forward] == [2]
    assert again.generations == first.generations == {2: 3}
    assert again.results == ['rp']


@pytest.mark.compensate_conf(compensate_forward_max_attempts=2)
def test_list_and_show_say_what_a_forward_failed_saga_waits_for(celery_app,
                                                               rds):
    from celery_compensate.cli import _current, _doing
    store = make(celery_app)
    passed(store)
    store.step_done('s', 3, '"r2"')
    store.step_failed('s', 2, 'e1', generation=1)
    store.step_failed('s', 2, 'e2', generation=2)
    [listed] = store.list_sagas(SagaState.FORWARD_FAILED)
    want = 'step 2 t.c1 failed past the pivot; retry drives it forward'
    assert _current(listed) == want
    assert _doing(store.read('s')) == want


def again(store: SagaStore, sid: str, token: str, *args):
    """step_failed as redis-py resends it after a lost reply: the same
    arguments, the same token."""
    s = store.settings
    return store._outcome(store.command('step_failed')(
        keys=store.keys.for_saga(sid),
        args=[token, '0', 60, *args, s.forward_max_attempts,
              s.undo_retry_backoff, s.undo_retry_backoff_max, '']))


@pytest.mark.compensate_conf(compensate_forward_max_attempts=2,
                             compensate_undo_retry_backoff=0.1)
def test_a_resent_failure_past_the_pivot_answers_like_the_first(celery_app,
                                                               rds):
    """Its caller published nothing (the reply was lost): the resend hands
    the same copy out again, and the budget's end is told again."""
    store = make(celery_app)
    passed(store)
    first = again(store, 's', 'tok-1', 2, 'e1', '', 1)
    resent = again(store, 's', 'tok-1', 2, 'e1', '', 1)
    assert first.status is resent.status is Reply.FORWARD_RETRY
    assert resent.generations == first.generations == {2: 2}
    assert resent.countdowns == first.countdowns == {2: 0.1}
    assert resent.results == ['rp']
    spent = again(store, 's', 'tok-2', 2, 'e2', '', 2)
    resent = again(store, 's', 'tok-2', 2, 'e2', '', 2)
    assert spent.status is resent.status is Reply.FORWARD_FAILED
    assert (resent.old_state, resent.new_state) == (
        SagaState.RUNNING, SagaState.FORWARD_FAILED)
