"""Pivot steps (``compensate_pivot``) against real workers: the point of
no return after which a saga goes forward.  A failure before the pivot
completed compensates as usual; past it, the failing step is retried (its
own Celery retries first, then the saga's forward budget), never undone;
its budget spent, the saga is FORWARD_FAILED until an operator's retry."""
from __future__ import annotations

import logging
import time

import pytest
from celery import group

from celery_compensate import (
    InvalidSaga, SagaCompensated, SagaForwardFailed, SagaState, saga, signals,
)

from .. import tasks
from ..helpers import ledger, undone, wait_for
from .test_recovery import HEARTBEAT, LEASE, SWEEP, _cluster, entries

#: quick forward retries (the undo backoff spaces them)
QUICK = dict(compensate_undo_retry_backoff=0.05,
             compensate_undo_retry_backoff_max=0.1)


def shop(fail_times: int = 0, step=tasks.forward):
    """reserve (undoable) -> capture (the pivot) -> ship (no undo)."""
    return saga(tasks.do.si('reserve'),
                tasks.do.si('capture').set(compensate_pivot=True),
                step.si('ship', fail_times=fail_times))


@pytest.mark.compensate_conf(compensate_forward_max_attempts=4, **QUICK)
def test_a_failure_past_the_pivot_is_retried_not_compensated(
        celery_app, celery_worker, rds):
    res = shop(fail_times=2).apply_async()
    assert res.get(timeout=15) == 'res-ship'
    log = ledger(rds, celery_app, res.id)
    assert log.count('start:ship') == 3 and undone(log) == []
    assert [s.state.name for s in res.steps] == ['DONE', 'DONE', 'DONE']


@pytest.mark.compensate_conf(compensate_forward_max_attempts=2, **QUICK)
def test_the_steps_own_celery_retries_come_first(celery_app, celery_worker,
                                                 rds):
    """One Celery retry per attempt (max_retries=1): 3 failures are the
    first attempt's two runs and the second attempt's first."""
    res = shop(fail_times=3, step=tasks.forward_retrying).apply_async()
    assert res.get(timeout=15) == 'res-ship'
    log = ledger(rds, celery_app, res.id)
    assert log.count('start:ship') == 4 and undone(log) == []


@pytest.mark.compensate_conf(compensate_forward_max_attempts=2, **QUICK)
def test_a_spent_budget_is_forward_failed_until_retried(
        celery_app, celery_worker, rds):
    told = []

    def on_forward_failed(sender=None, **kwargs):
        told.append(kwargs)

    signals.saga_forward_failed.connect(on_forward_failed, weak=False)
    try:
        res = shop(fail_times=3).apply_async()
        with pytest.raises(SagaForwardFailed) as caught:
            res.get(timeout=15)
    finally:
        signals.saga_forward_failed.disconnect(on_forward_failed)
    assert caught.value.failed_step == 2
    assert 'ship failed on purpose' in caught.value.reason
    assert res.state is SagaState.FORWARD_FAILED and res.failed()
    assert told == [{'signal': signals.saga_forward_failed, 'saga_id': res.id,
                     'step': 2, 'error': 'ValueError: ship failed on purpose'}]
    log = ledger(rds, celery_app, res.id)
    assert log.count('start:ship') == 2 and undone(log) == []
    # nothing happens by itself: it waits for an operator
    time.sleep(0.5)
    assert res.state is SagaState.FORWARD_FAILED
    assert ledger(rds, celery_app, res.id).count('start:ship') == 2
    assert res.retry() is True              # a fresh budget: fail, then ok
    assert res.get(timeout=15) == 'res-ship'
    log = ledger(rds, celery_app, res.id)
    assert log.count('start:ship') == 4 and undone(log) == []
    assert res.info().retries == 1


@pytest.mark.compensate_conf(**QUICK)
def test_a_failing_pivot_compensates(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('reserve'),
               tasks.do.si('capture', fail=True).set(compensate_pivot=True),
               tasks.forward.si('ship')).apply_async()
    with pytest.raises(SagaCompensated) as caught:
        res.get(timeout=15)
    assert caught.value.failed_step == 1
    log = ledger(rds, celery_app, res.id)
    assert undone(log) == ['reserve'] and 'start:ship' not in log


def test_an_abort_past_the_pivot_is_refused(celery_app, celery_worker, rds,
                                            caplog):
    res = saga(tasks.do.si('reserve'),
               tasks.do.si('capture').set(compensate_pivot=True),
               tasks.do.si('ship', sleep=1.0).set(compensate_with=None)
               ).apply_async()
    wait_for(lambda: 'start:ship' in ledger(rds, celery_app, res.id))
    with caplog.at_level(logging.WARNING, logger='celery_compensate.result'):
        assert res.abort() is False
    assert 'its pivot completed' in caplog.text
    assert res.get(timeout=15) == 'res-ship'
    assert undone(ledger(rds, celery_app, res.id)) == []


def test_a_saga_that_breaks_the_pivot_rules_is_refused(celery_app):
    pivot = tasks.do.si('capture').set(compensate_pivot=True)
    with pytest.raises(InvalidSaga, match=r'step 2 \(t\.do\): it comes after '
                       r'the pivot step 1 \(t\.do\) and has an undo'):
        saga(tasks.do.si('a'), pivot, tasks.do.si('b'))
    with pytest.raises(InvalidSaga, match='at most one pivot'):
        saga(pivot, tasks.forward.si('b').set(compensate_pivot=True))
    with pytest.raises(InvalidSaga, match='member of a parallel stage'):
        saga(tasks.do.si('a'), group(pivot, tasks.forward.si('b')))
    with pytest.raises(InvalidSaga, match='compensate_pivot must be True'):
        saga(tasks.do.si('a').set(compensate_pivot='yes'))


@pytest.mark.prefork
def test_a_step_lost_past_the_pivot_is_sent_again_not_compensated(
        redis_url):
    """The whole worker running ship dies: its lease lapses and the sweep
    publishes it again (a forward attempt), where before the pivot it would
    have given it up and compensated."""
    with _cluster(redis_url, step_timeout=LEASE, queue_timeout=2 * LEASE,
                  heartbeat_interval=HEARTBEAT, recovery_interval=SWEEP
                  ) as (app, rds, start):
        first = start('first')
        res = saga(tasks.do.si('reserve'),
                   tasks.do.si('capture').set(compensate_pivot=True),
                   tasks.forward.si('ship', kill_once=True), app=app
                   ).apply_async()
        wait_for(lambda: first.proc.poll() is not None, timeout=15)
        start('second')
        assert res.wait(timeout=20) is SagaState.COMPLETED
        log = entries(app, rds, res.id)
        assert undone(log) == [] and log.count('start:ship') == 2


@pytest.mark.compensate_conf(compensate_forward_max_attempts=4, **QUICK)
def test_each_failure_told_twice_is_one_attempt(celery_app, celery_worker,
                                                rds):
    """``Reject(requeue=False)`` is told inside the call (with the copy's
    generation) and again by the worker's main process (with only the task
    id): each run is one attempt, so 4 attempts are 4 runs."""
    res = saga(tasks.do.si('reserve'),
               tasks.do.si('capture').set(compensate_pivot=True),
               tasks.do.si('ship', reject=True).set(compensate_with=None)
               ).apply_async()
    assert res.wait(timeout=15) is SagaState.FORWARD_FAILED
    assert ledger(rds, celery_app, res.id).count('start:ship') == 4
    assert res.info().steps[2].attempts == 4


@pytest.mark.compensate_conf(compensate_forward_max_attempts=3, **QUICK)
def test_a_revoke_past_the_pivot_stops_the_step_until_an_operator_retries(
        celery_app, celery_worker, rds):
    """The operator revokes ship before it runs: it is not tried again
    (FORWARD_FAILED at once, reason revoked); a retry publishes a copy with
    an id of its own, which the revoke does not stop."""
    res = saga(tasks.do.si('reserve'),
               tasks.do.si('capture', sleep=0.5).set(compensate_pivot=True),
               tasks.forward.si('ship')).apply_async()
    celery_app.control.revoke(f'{res.id}.s2')
    assert res.wait(timeout=10) is SagaState.FORWARD_FAILED
    assert res.info().reason == 'revoked'
    assert 'start:ship' not in ledger(rds, celery_app, res.id)
    assert res.retry() is True
    assert res.get(timeout=10) == 'res-ship'
    assert res.info().steps[2].task_id == f'{res.id}.s2.2'
