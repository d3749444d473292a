"""install() must leave ordinary Celery usage as it was, and survive what
users do to their task classes."""
from __future__ import annotations

import pytest

from celery_compensate import SagaState, saga

from .. import tasks
from ..helpers import ledger, wait_for
from ..helpers import undone


def test_a_plain_task_runs_with_the_workers_own_request(
        celery_app, celery_worker, rds):
    result = tasks.request_depth.apply_async(
        headers={'compensate_saga_id': 'plain'})
    key = tasks.ledger_key(celery_app, 'plain')
    entries = wait_for(lambda: rds.lrange(key, 0, -1))
    assert entries == [f'depth:1:{result.id}']


def test_a_saga_step_runs_with_the_workers_own_request(
        celery_app, celery_worker, rds):
    res = saga(tasks.request_depth.si()).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPLETED
    assert ledger(rds, celery_app, res.id) == [f'depth:1:{res.id}.s0']


def test_a_step_calling_itself_is_recorded_once_with_its_own_result(
        celery_app, celery_worker, rds):
    res = saga(tasks.recursive.si('r'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    assert res.steps[0].result == 'inner+outer'
    assert "undo:r:'inner+outer'" in ledger(rds, celery_app, res.id)


def test_a_replaced_step_is_undone_with_its_own_arguments(
        celery_app, celery_worker, rds):
    res = saga(tasks.replaced.si('x'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert "undo:x:'res-x-replacement'" in entries


@pytest.mark.compensate_conf(
    task_annotations=[{'*': {'@__call__': tasks.around_call}}])
def test_a_users_annotation_around_call_does_not_drop_the_hook(
        celery_app, celery_worker, rds):
    """Celery's add_around unwraps the wrapper it finds; the worker wraps
    every task again at worker_init."""
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert entries.count('around') >= 3 and undone(entries) == ['a']
