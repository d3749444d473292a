"""Failures only a prefork pool produces: time limits, killed pool
children, revoke with terminate, a child dying after the next link was
published.  Several of these reach us only from the worker's main process,
with the task id and no headers."""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
from celery import Celery

from celery_compensate import SagaState, install, saga
from celery_compensate.testing import WorkerProcess, delete_keys

from .. import tasks
from ..helpers import wait_for
from ..helpers import undone

pytestmark = pytest.mark.prefork
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def pf(redis_url: str) -> Iterator[tuple[Celery, redis.Redis, WorkerProcess]]:
    """A producer app and one prefork worker subprocess (concurrency 2)."""
    prefix = f'cctest-pf-{uuid.uuid4().hex[:8]}'
    app = Celery('pf-producer', broker=redis_url, set_as_current=False)
    app.conf.update(compensate_key_prefix=prefix,
                    task_default_queue=f'{prefix}-q')
    install(app)
    worker = WorkerProcess('tests.prefork_app', {
        'COMPENSATE_TEST_BROKER': redis_url,
        'COMPENSATE_TEST_PREFIX': prefix,
        'COMPENSATE_TEST_QUEUE': f'{prefix}-q',
    }, '-P', 'prefork', '-c', '2', '-Q', f'{prefix}-q', name='pf',
        cwd=ROOT).start()
    rds = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield app, rds, worker
    finally:
        worker.stop()
        delete_keys(rds, f'{prefix}*')
        rds.close()
        app.close()


def run(pf, *steps, timeout=30) -> tuple[SagaState, list[str], str]:
    app, rds, _ = pf
    res = saga(*steps, app=app).apply_async()
    state = res.wait(timeout=timeout)
    return state, rds.lrange(tasks.ledger_key(app, res.id), 0, -1), res.id


def test_soft_time_limit_compensates(pf):
    state, entries, _ = run(pf, tasks.do.si('a'), tasks.do.si(
        'b', sleep=5).set(soft_time_limit=0.5))
    assert state is SagaState.COMPENSATED and undone(entries) == ['a']


def test_hard_time_limit_compensates_once(pf):
    """Celery sends task_failure twice here; compensation starts once."""
    state, entries, sid = run(pf, tasks.do.si('a'), tasks.do.si(
        'b', sleep=5).set(time_limit=1))
    assert state is SagaState.COMPENSATED
    assert entries.count('undo-start:a') == 1 and undone(entries) == ['a']
    assert pf[2].output().count(f'saga {sid}: COMPENSATING') == 1


def test_killed_pool_child_compensates(pf):
    state, entries, _ = run(pf, tasks.do.si('a'), tasks.do.si('b', kill=True),
                            tasks.do.si('c'))
    assert state is SagaState.COMPENSATED and undone(entries) == ['a']
    assert 'start:c' not in entries


def test_revoke_of_a_running_step_compensates(pf):
    app, rds, _ = pf
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=20), app=app).apply_async()
    key = tasks.ledger_key(app, res.id)
    wait_for(lambda: 'start:b' in rds.lrange(key, 0, -1), timeout=15)
    app.control.revoke(f'{res.id}.s1', terminate=True, signal='SIGKILL')
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = rds.lrange(key, 0, -1)
    assert 'do:b' not in entries and undone(entries) == ['a']


def test_child_dying_after_the_step_was_recorded_counts_as_completed(pf):
    """Celery logs "succeeded before the worker was lost" and signals
    nothing; the step was recorded inside the call, so it counts."""
    state, entries, sid = run(pf, tasks.dies_after.si('a'), tasks.do.si('b'))
    assert state is SagaState.COMPLETED and undone(entries) == []
    wait_for(lambda: f'{sid}.s0] succeeded before the worker was lost'
             in pf[2].output())
    state, entries, _ = run(pf, tasks.dies_after.si('a'),
                            tasks.do.si('b', fail=True))
    assert state is SagaState.COMPENSATED and undone(entries) == ['a']


def test_undo_killed_mid_way_is_retried(pf):
    app, _, _ = pf
    state, entries, sid = run(pf, tasks.do.si('a', undo_kill_once=True),
                              tasks.do.si('b', fail=True))
    assert state is SagaState.COMPENSATED
    assert entries.count('undo-start:a') == 2 and undone(entries) == ['a']
    from celery_compensate import SagaResult
    assert SagaResult(sid, app=app).steps[0].undo_attempts == 2


def test_step_redelivered_after_its_worker_died_is_not_run_again(pf, redis_url):
    """The whole worker dies after step a was recorded but before its
    message was acknowledged (acks_late); kombu redelivers it to the next
    worker, which must not run the body again."""
    app, rds, _ = pf
    queue = f'{app.conf.compensate_key_prefix}-redeliver'
    worker = WorkerProcess('tests.prefork_app', {
        'COMPENSATE_TEST_BROKER': redis_url,
        'COMPENSATE_TEST_PREFIX': app.conf.compensate_key_prefix,
        'COMPENSATE_TEST_QUEUE': queue, 'COMPENSATE_TEST_VISIBILITY': '1',
    }, '-P', 'prefork', '-c', '1', '-Q', queue, name='redeliver', cwd=ROOT)
    try:
        worker.start()
        res = saga(tasks.kills_worker.si('a'), tasks.do.si('b'),
                   app=app).apply_async(queue=queue)
        wait_for(lambda: worker.proc.poll() is not None, timeout=15)
        # kombu restores only messages unacked for longer than the
        # visibility timeout (1 s here): let that much time pass
        time.sleep(1.2)
        worker.start()
        assert res.wait(timeout=20) is SagaState.COMPLETED
        # the redelivered copy of step a has been processed
        wait_for(lambda: f'{res.id}.s0] succeeded' in worker.output())
        entries = rds.lrange(tasks.ledger_key(app, res.id), 0, -1)
        assert entries.count('do:a') == 1 and entries.count('do:b') == 1
        assert 'not run again (redelivered): it is already done' in worker.output()
    finally:
        worker.stop()
