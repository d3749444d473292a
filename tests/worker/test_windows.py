"""Faults placed exactly between two of the library's own actions.

Random chaos rarely lands in these windows; each test here puts a fault in
one on purpose, against real prefork workers (``celery worker -P prefork``
subprocesses) and a real Redis, and checks that the saga ends, on time and
correctly:

- a whole worker killed right after it received a step (before any
  heartbeat): the step's lease, not the queue timeout;
- the process that recorded a step killed before it published the next
  (a ``before_task_publish`` hook in ``tests/prefork_app.py`` SIGKILLs it
  exactly there): the next link is published again, its body runs once;
- a step that goes back to the broker (``self.retry`` into a queue nobody
  consumes yet) and waits there longer than its lease: not compensated;
- an abort a moment after a step started: no undo overtakes it.
"""
from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest
import redis
from celery import Celery

from celery_compensate import SagaResult, SagaState, StepState, saga
from celery_compensate.appstate import get_state
from celery_compensate.messages import OUTBOX_UNTIL, SAGA_ID, STEP
from celery_compensate.model import step_task_id, undo_task_id
from celery_compensate.store import layout as L
from celery_compensate.testing import redis_server

from .. import tasks
from ..helpers import undone, wait_for
from .test_recovery import _cluster, entries

pytestmark = pytest.mark.prefork

#: the step lease and the sweep interval of these workers; the heartbeat is
#: long next to the few milliseconds each fault takes to land, so each
#: lands before the worker renews anything
LEASE, SWEEP, HEARTBEAT = 3.0, 0.5, 1.0
#: how long a message may wait in the broker: long, so that a saga ended
#: by the queue timeout fails the test
QUEUE = 60.0


@pytest.fixture
def cluster(redis_url):
    with _cluster(redis_url, step_timeout=LEASE, queue_timeout=QUEUE,
                  heartbeat_interval=HEARTBEAT,
                  recovery_interval=SWEEP) as env:
        yield env


def _sweeper(app, start):
    """A worker that consumes nothing the sagas use: it only sweeps (and
    holds the sweeper lock before any fault)."""
    prefix = app.conf.compensate_key_prefix
    return start('sweeper', '-Q', f'{prefix}-idle')


def test_whole_worker_killed_right_after_receiving_a_step(cluster):
    """Killed before its first heartbeat: the step was marked held when the
    worker received it, so the sweep gives it up within its lease plus a
    sweep (plus a second), not the queue timeout."""
    app, rds, start = cluster
    _sweeper(app, start)
    first = start('first')
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=60), tasks.do.si('c'),
               app=app).apply_async()
    wait_for(lambda: 'start:b' in entries(app, rds, res.id), timeout=15,
             interval=0.005)
    first.kill()
    killed = time.monotonic()
    wait_for(lambda: res.steps[1].state is StepState.FAILED,
             timeout=LEASE + SWEEP + 10, interval=0.05)
    elapsed = time.monotonic() - killed
    assert elapsed < LEASE + 2 * SWEEP + 1, elapsed
    start('second')              # runs the undo
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    assert undone(entries(app, rds, res.id)) == ['a']
    assert 'lost: its worker died' in res.steps[1].failure


def test_a_busy_worker_killed_by_a_step_as_it_starts(cluster):
    """A burst keeps the worker busy, so its receipts go out in batches;
    one step SIGKILLs the whole worker the moment its body starts (as an
    OOM kill would).  The step reached the pool only after its receipt was
    recorded, so it is given up within its lease plus a sweep, not after
    the queue timeout."""
    app, rds, start = cluster
    _sweeper(app, start)
    worker = start('busy')
    fillers = [saga(tasks.do.si(f'f{n}'), app=app) for n in range(40)]
    killer = saga(tasks.do.si('a', kill_worker=True), tasks.do.si('b'),
                  app=app)
    for sig in fillers[:20]:
        sig.apply_async()
    res = killer.apply_async()
    for sig in fillers[20:]:
        sig.apply_async()
    wait_for(lambda: 'start:a' in entries(app, rds, res.id), timeout=15,
             interval=0.005)
    wait_for(lambda: worker.proc.poll() is not None, timeout=5)
    killed = time.monotonic()
    wait_for(lambda: res.steps[0].state is StepState.FAILED,
             timeout=LEASE + SWEEP + 10, interval=0.05)
    assert time.monotonic() - killed < LEASE + 2 * SWEEP + 1
    assert 'lost: its worker died' in res.steps[0].failure
    assert res.wait(timeout=10) is SagaState.COMPENSATED


@contextmanager
def store_away_as_b_completes(redis_url: str, **worker_env: str) -> Iterator[
        tuple[Celery, redis.Redis, SagaResult]]:
    """Sagas a -> b -> c on one prefork worker whose saga store is a Redis
    of its own; that store takes no writes for 2.5 s (``CLIENT PAUSE``),
    longer than ``compensate_record_retry_timeout``, just as b completes.
    Yields the producer app, a client of the broker (the ledger) and the
    saga's handle, the pause begun."""
    with redis_server(env_names=()) as store_url, _cluster(
            redis_url, worker_env={'COMPENSATE_TEST_STORE_URL': store_url,
                                   'COMPENSATE_TEST_LEDGER_URL': redis_url,
                                   **worker_env},
            step_timeout=LEASE, queue_timeout=QUEUE,
            heartbeat_interval=HEARTBEAT, recovery_interval=SWEEP,
            record_retry_timeout=0.5, redis_socket_timeout=0.3,
            redis_url=store_url) as (app, rds, start):
        store = redis.Redis.from_url(store_url)
        try:
            start('one')
            res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=0.5),
                       tasks.do.si('c'), app=app).apply_async()
            wait_for(lambda: 'start:b' in entries(app, rds, res.id),
                     timeout=15, interval=0.005)
            store.execute_command('CLIENT', 'PAUSE', 2500, 'WRITE')
            yield app, rds, res
        finally:
            store.close()


def test_a_step_completed_while_the_store_is_away_is_recorded_by_its_worker(
        redis_url):
    """The saga store takes no writes for longer than
    ``compensate_record_retry_timeout`` just as step b completes: the pool
    child gives up and leaves the completion in its worker's spool; the
    worker keeps b held, records it once the store is back and publishes
    c.  The saga completes, every body ran once, nothing is undone."""
    with store_away_as_b_completes(redis_url) as (app, rds, res):
        wait_for(lambda: 'do:b' in entries(app, rds, res.id), timeout=5)
        assert res.wait(timeout=LEASE + 15) is SagaState.COMPLETED
        log = entries(app, rds, res.id)
        assert [e for e in log if e.startswith('do:')] == [
            'do:a', 'do:b', 'do:c']
        assert undone(log) == []


@pytest.mark.parametrize('mode', ['child', 'worker'])
def test_killed_between_recording_a_step_and_publishing_the_next(
        cluster, mode):
    """Step a is recorded done; its process (the pool child, or the whole
    worker) dies before b is published.  The record lists b as not yet
    confirmed published; the sweep publishes it within its lease plus a
    sweep, and the saga completes with every body run once."""
    app, rds, start = cluster
    _sweeper(app, start)
    start('one')
    start('two')
    saga_id = f'kill-{mode}-{uuid.uuid4().hex[:8]}'
    rds.set(tasks.kill_on_publish_key(app.conf.compensate_key_prefix),
            f'{saga_id}:1:{mode}')
    started = time.monotonic()
    res = saga(tasks.do.si('a', sleep=0.5), tasks.do.si('b'),
               tasks.do.si('c'), app=app).apply_async(saga_id=saga_id)
    assert res.wait(timeout=LEASE + SWEEP + 15) is SagaState.COMPLETED
    assert time.monotonic() - started < 0.5 + LEASE + 2 * SWEEP + 3
    assert rds.get(tasks.kill_on_publish_key(app.conf.compensate_key_prefix)) is None
    log = entries(app, rds, res.id)
    assert [e for e in log if e.startswith('do:')] == ['do:a', 'do:b', 'do:c']
    assert undone(log) == []


def test_a_retried_step_waiting_in_the_broker_is_not_compensated(cluster):
    """b runs past a heartbeat (so its worker renewed it: held), then
    retries into a queue nobody consumes and waits there three leases.
    Back in the broker it holds the queue lease, not its worker's, so the
    saga stays RUNNING; once a worker consumes that queue it completes."""
    app, rds, start = cluster
    start('first')
    prefix = app.conf.compensate_key_prefix
    park = f'{prefix}-parked'
    res = saga(tasks.do.si('a'), tasks.parked.si('b', park, sleep=HEARTBEAT + 0.5), tasks.do.si('c'),
               app=app).apply_async()
    wait_for(lambda: 'try:b:0' in entries(app, rds, res.id), timeout=15)
    time.sleep(HEARTBEAT + 0.5 + 3 * LEASE + 2 * SWEEP)   # the fault is the wait itself
    assert res.state is SagaState.RUNNING
    assert res.steps[1].state is StepState.RUNNING
    start('parked', '-Q', park)
    assert res.wait(timeout=20) is SagaState.COMPLETED
    log = entries(app, rds, res.id)
    assert 'do:b' in log and undone(log) == []


def test_abort_a_moment_after_a_step_started_terminates_it(cluster):
    """The abort comes a moment after b started, before its worker's first
    heartbeat.  b was marked held when received, so the abort does not take
    it for never started (it would then be undone, if it completed, after
    a's undo): it is revoked with terminate, and its stage settles when the
    worker reports it terminated."""
    app, rds, start = cluster
    start('only')
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=30),
               tasks.do.si('c'), app=app).apply_async()
    wait_for(lambda: 'start:b' in entries(app, rds, res.id), timeout=15,
             interval=0.005)
    assert res.abort() is True
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    log = entries(app, rds, res.id)
    assert undone(log) == ['a'] and 'do:b' not in log, log
    assert 'terminated' in res.steps[1].failure, res.steps[1].failure


def test_an_older_copy_of_a_step_published_again_does_not_run(cluster):
    """The sweep published b again (its publisher died before confirming
    it); while that copy runs, the original message turns up late (past
    its outbox window).  It checks the record before its body, finds a
    newer generation and does not run: b's body runs once."""
    app, rds, start = cluster
    _sweeper(app, start)
    workers = [start('one'), start('two')]
    prefix = app.conf.compensate_key_prefix
    saga_id = f'older-{uuid.uuid4().hex[:8]}'
    rds.set(tasks.kill_on_publish_key(prefix), f'{saga_id}:1:child')
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=3), tasks.do.si('c'),
               app=app).apply_async(saga_id=saga_id)
    key = get_state(app).store.keys.saga(saga_id)
    wait_for(lambda: rds.hget(key, L.generation(1)) == '2'
             and 'start:b' in entries(app, rds, saga_id), timeout=20)
    app.signature('t.do', args=('b',), kwargs={'sleep': 3}).apply_async(
        task_id=step_task_id(saga_id, 1),
        headers={SAGA_ID: saga_id, STEP: 1,
                 OUTBOX_UNTIL: round(time.time() - 60, 3)})
    wait_for(lambda: any('it was published again; this copy is older'
                         in w.output() for w in workers), timeout=15)
    assert res.wait(timeout=20) is SagaState.COMPLETED
    log = entries(app, rds, saga_id)
    assert log.count('start:b') == 1 and log.count('do:b') == 1, log


def test_killed_between_making_an_undo_due_and_publishing_it(cluster):
    """b fails; its pool child records the claim (a's undo due) and is
    SIGKILLed before publishing the undo.  Until its publisher confirms it,
    the undo has its own lease, not the queue timeout: the sweep sends it
    within that lease plus a sweep, and the saga is compensated."""
    app, rds, start = cluster
    _sweeper(app, start)
    start('one')
    prefix = app.conf.compensate_key_prefix
    saga_id = f'undo-kill-{uuid.uuid4().hex[:8]}'
    rds.set(tasks.kill_on_publish_key(prefix), f'{saga_id}:u0:child')
    started = time.monotonic()
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True),
               app=app).apply_async(saga_id=saga_id)
    assert res.wait(timeout=LEASE + SWEEP + 15) is SagaState.COMPENSATED
    assert time.monotonic() - started < LEASE + 2 * SWEEP + 4
    assert rds.get(tasks.kill_on_publish_key(prefix)) is None
    assert undone(entries(app, rds, saga_id)) == ['a']


def test_a_requeued_undo_copy_does_not_keep_a_dead_attempt_alive(redis_url):
    """acks_late + task_reject_on_worker_lost: the undo's pool child is
    SIGKILLed and its message requeued.  The requeued copy finds the
    attempt running (in the dead copy) and tries again; it stops after the
    undo's lease, so its worker stops renewing the dead attempt, the sweep
    counts it lost and the next attempt runs: the compensation ends."""
    with _cluster(redis_url, step_timeout=LEASE, queue_timeout=QUEUE,
                  heartbeat_interval=HEARTBEAT, recovery_interval=SWEEP,
                  worker_env={'COMPENSATE_TEST_REJECT_ON_WORKER_LOST': '1'}
                  ) as (app, rds, start):
        start('only')
        res = saga(tasks.do.si('a', undo_kill_once=True),
                   tasks.do.si('b', fail=True), app=app).apply_async()
        assert res.wait(timeout=4 * LEASE + 15) is SagaState.COMPENSATED
        assert undone(entries(app, rds, res.id)) == ['a']
        assert res.steps[0].undo_attempts == 2


def test_a_running_undo_revoked_with_terminate_is_tried_again(cluster):
    """An operator (or Celery) revokes the running undo with terminate:
    ``task_revoked`` (terminated) counts the attempt as failed and the next
    one runs after the backoff; the saga is compensated."""
    app, rds, start = cluster
    start('only')
    res = saga(tasks.do.si('a', undo_hang_once=True),
               tasks.do.si('b', fail=True), app=app).apply_async()
    wait_for(lambda: 'undo-hang:a' in entries(app, rds, res.id), timeout=15)
    app.control.revoke(undo_task_id(res.id, 0, 1), terminate=True)
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    assert undone(entries(app, rds, res.id)) == ['a']
    step = res.steps[0]
    assert step.undo_attempts == 2 and 'terminated' in step.undo_error


def test_a_step_redelivered_before_its_lease_lapsed_runs_again(redis_url):
    """acks_late with a visibility timeout (1 s) shorter than the step's
    lease (10 s): the whole worker running b is SIGKILLed, the next worker
    to start restores b's message at once; that copy (redelivered) finds b
    still running in the record, takes it over and runs it again (its body
    may have run partly, as for any acks_late task); the saga completes."""
    with _cluster(redis_url, step_timeout=10.0, queue_timeout=QUEUE,
                  heartbeat_interval=HEARTBEAT, recovery_interval=SWEEP,
                  worker_env={'COMPENSATE_TEST_REJECT_ON_WORKER_LOST': '1',
                              'COMPENSATE_TEST_VISIBILITY': '1'}
                  ) as (app, rds, start):
        first = start('first')
        res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=2),
                   tasks.do.si('c'), app=app).apply_async()
        wait_for(lambda: 'start:b' in entries(app, rds, res.id), timeout=15)
        first.kill()
        time.sleep(1.2)         # older than the visibility timeout
        start('second')
        assert res.wait(timeout=20) is SagaState.COMPLETED
        log = entries(app, rds, res.id)
        assert log.count('start:b') == 2 and log.count('do:b') == 1, log
        assert undone(log) == []
