"""Nested sagas with faults placed exactly between the library's own
actions, against real prefork workers (see ``test_windows.py``):

- the process that stored a child killed before it published the child's
  first step: the child's outbox, then the sweep, publish it;
- the process that reported a completed child to its parent killed
  before it published the parent's next step: the parent's outbox and the
  child's owed report both resend it, and it runs once;
- the process that unwound a completed child killed before it published
  the child's first undo: the sweep sends it;
- a whole worker killed while it runs a step inside the child: the child
  compensates, then its parent.
"""
from __future__ import annotations

import time
import uuid

import pytest

from celery_compensate import SagaState, StepState, saga

from .. import tasks
from ..helpers import assert_stage_order, undone, wait_for
from . import test_windows
from .test_recovery import entries
from .test_windows import LEASE, SWEEP, _sweeper

pytestmark = pytest.mark.prefork

#: the windows' workers: a short lease and sweep, a long queue timeout
cluster = test_windows.cluster


def _kill_on(app, rds, saga_id: str, step: str, mode: str = 'child') -> None:
    rds.set(tasks.kill_on_publish_key(app.conf.compensate_key_prefix),
            f'{saga_id}:{step}:{mode}')


def _killed(app, rds) -> bool:
    return rds.get(tasks.kill_on_publish_key(
        app.conf.compensate_key_prefix)) is None


@pytest.mark.parametrize('mode', ['child', 'worker'])
def test_killed_between_storing_a_child_and_publishing_its_first_step(
        cluster, mode):
    app, rds, start = cluster
    _sweeper(app, start)
    start('one')
    start('two')
    sid = f'nest-start-{mode}-{uuid.uuid4().hex[:8]}'
    _kill_on(app, rds, f'{sid}~1', '0', mode)
    started = time.monotonic()
    res = saga(tasks.do.si('a', sleep=0.5),
               saga(tasks.do.si('b'), tasks.do.si('c'), app=app),
               tasks.do.si('d'), app=app).apply_async(saga_id=sid)
    assert res.wait(timeout=LEASE + SWEEP + 20) is SagaState.COMPLETED
    assert time.monotonic() - started < 0.5 + LEASE + 2 * SWEEP + 5
    assert _killed(app, rds)
    log = entries(app, rds, sid)
    assert [e for e in log if e.startswith('do:')] == [
        'do:a', 'do:b', 'do:c', 'do:d']
    assert undone(log) == []


def test_killed_between_reporting_a_child_and_publishing_the_next_step(
        cluster):
    app, rds, start = cluster
    _sweeper(app, start)
    start('one')
    start('two')
    sid = f'nest-report-{uuid.uuid4().hex[:8]}'
    _kill_on(app, rds, sid, '2')
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), tasks.do.si('c', sleep=0.5), app=app),
               tasks.do.si('d'), app=app).apply_async(saga_id=sid)
    assert res.wait(timeout=LEASE + SWEEP + 20) is SagaState.COMPLETED
    assert _killed(app, rds)
    log = entries(app, rds, sid)
    assert [e for e in log if e.startswith('do:')] == [
        'do:a', 'do:b', 'do:c', 'do:d']
    # the owed report was settled by the sweep: nothing is left in :due
    child = res.children[0]
    wait_for(lambda: child.info().state is SagaState.COMPLETED)


def test_killed_between_unwinding_a_child_and_publishing_its_undo(
        cluster):
    app, rds, start = cluster
    _sweeper(app, start)
    start('one')
    start('two')
    sid = f'nest-unwind-{uuid.uuid4().hex[:8]}'
    _kill_on(app, rds, f'{sid}~1', 'u1')
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), tasks.do.si('c'), app=app),
               tasks.do.si('d', fail=True), app=app).apply_async(saga_id=sid)
    assert res.wait(timeout=LEASE + SWEEP + 30) is SagaState.COMPENSATED
    assert _killed(app, rds)
    log = entries(app, rds, sid)
    assert undone(log) == ['c', 'b', 'a']
    assert_stage_order(log, {'c', 'b'}, {'a'})


def test_a_worker_killed_inside_the_child(cluster):
    app, rds, start = cluster
    _sweeper(app, start)
    first = start('first')
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), tasks.do.si('c', sleep=60), app=app),
               tasks.do.si('d'), app=app).apply_async()
    wait_for(lambda: 'start:c' in entries(app, rds, res.id), timeout=15,
             interval=0.005)
    first.kill()
    start('second')
    assert res.wait(timeout=LEASE + SWEEP + 30) is SagaState.COMPENSATED
    child = res.children[0]
    assert child.steps[1].state is StepState.FAILED
    assert 'lost' in child.steps[1].failure
    log = entries(app, rds, res.id)
    assert undone(log) == ['b', 'a']
    assert 'start:d' not in log
