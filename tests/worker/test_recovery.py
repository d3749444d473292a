"""Recovery: leases renewed by live workers, the sweep that acts when they
lapse, and operator aborts.

Whole workers are real ``celery worker -P prefork`` subprocesses killed
with SIGKILL (nothing in Celery reports that); the rest runs on the
in-process threads worker with short leases.
"""
from __future__ import annotations

import logging
import signal
import time
import types
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis
from celery import Celery

from celery_compensate import (
    SagaNotFound, SagaResult, SagaState, StepState, UndoState, install, saga,
)
from celery_compensate.appstate import get_state
from celery_compensate.messages import SAGA_ID, STEP
from celery_compensate.model import Plan, TaskRef, UndoSpec, step_task_id
from celery_compensate.recovery import STALE_BATCH, Recovery
from celery_compensate.store import shard_of
from celery_compensate.testing import WorkerProcess, delete_keys
from celery_compensate.store import layout as L

from .. import tasks
from ..helpers import FAST, ledger, undone, wait_for

ROOT = Path(__file__).resolve().parents[2]

#: the prefork workers' settings (string values for the environment)
LEASE, HEARTBEAT, SWEEP = 2.0, 0.25, 0.5


# -- whole workers killed ---------------------------------------------------

@contextmanager
def _cluster(redis_url: str, /, worker_env: dict[str, str] | None = None,
             **conf: float) -> Iterator[
        tuple[Celery, redis.Redis, Callable[..., WorkerProcess]]]:
    """A producer app and a factory of prefork workers on its queue, all
    with the ``compensate_*`` settings ``conf`` (``step_timeout`` ...)."""
    prefix = f'cctest-rc-{uuid.uuid4().hex[:8]}'
    app = Celery('rc-producer', broker=redis_url, set_as_current=False)
    app.conf.update(compensate_key_prefix=prefix,
                    task_default_queue=f'{prefix}-q',
                    **{f'compensate_{k}': v for k, v in conf.items()})
    install(app)
    workers: list[WorkerProcess] = []

    def start(name: str, *args: str) -> WorkerProcess:
        worker = WorkerProcess('tests.prefork_app', {
            'COMPENSATE_TEST_BROKER': redis_url,
            'COMPENSATE_TEST_PREFIX': prefix,
            'COMPENSATE_TEST_QUEUE': f'{prefix}-q',
            **{f'COMPENSATE_TEST_{k.upper()}': str(v)
               for k, v in conf.items()},
            **(worker_env or {}),
        }, '-P', 'prefork', '-c', '2', '-Q', f'{prefix}-q', *args, name=name,
            cwd=ROOT)
        workers.append(worker)
        return worker.start()

    rds = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield app, rds, start
    finally:
        for worker in workers:
            worker.stop()
        delete_keys(rds, f'{prefix}*')
        rds.close()
        app.close()


@pytest.fixture
def cluster(redis_url: str) -> Iterator[tuple[Celery, redis.Redis,
                                              Callable[..., WorkerProcess]]]:
    """A producer app and a factory of prefork workers on its queue."""
    with _cluster(redis_url, step_timeout=LEASE, queue_timeout=2 * LEASE,
                  heartbeat_interval=HEARTBEAT,
                  recovery_interval=SWEEP) as env:
        yield env


def entries(app: Celery, rds: redis.Redis, saga_id: str) -> list[str]:
    return rds.lrange(tasks.ledger_key(app, saga_id), 0, -1)


@pytest.mark.prefork
@pytest.mark.parametrize('opt_in', [False, True],
                         ids=['plain', 'compensate_on_failure'])
def test_whole_worker_killed_during_a_step(cluster, opt_in):
    """Nothing in Celery reports it; the step's lease lapses and the next
    live worker's sweep compensates, long before any visibility timeout.
    The step is in doubt: its own undo runs only if it opted in."""
    app, rds, start = cluster
    first = start('first')
    if rds.config_get('appendonly')['appendonly'] == 'no':
        # the test Redis runs without AOF: the worker says so at start
        wait_for(lambda: 'has no append-only file' in first.output())
    res = saga(tasks.do.si('a'),
               tasks.do.si('b', sleep=60).set(compensate_on_failure=opt_in),
               tasks.do.si('c'), app=app).apply_async()
    wait_for(lambda: 'start:b' in entries(app, rds, res.id), timeout=15)
    first.kill()
    killed = time.monotonic()
    start('second')
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    elapsed = time.monotonic() - killed
    log = entries(app, rds, res.id)
    assert undone(log) == (['b', 'a'] if opt_in else ['a'])
    assert 'start:c' not in log
    step = res.steps[1]
    assert step.state is StepState.FAILED and 'lost' in step.failure
    # lease + sweeper hand-over + sweep + hold, plus a worker start
    assert elapsed < 15, elapsed


@pytest.mark.prefork
def test_whole_worker_killed_during_an_undo(cluster):
    """The compensation resumes where it stopped: the lost attempt counts,
    the undo runs again (same idempotency key), then the stage before;
    finished undos are not repeated."""
    app, rds, start = cluster
    first = start('first')
    res = saga(tasks.do.si('a'), tasks.do.si('b', undo_hang_once=True),
               tasks.do.si('c', fail=True), app=app).apply_async()
    wait_for(lambda: 'undo-hang:b' in entries(app, rds, res.id), timeout=15)
    first.kill()
    start('second')
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    log = entries(app, rds, res.id)
    assert undone(log) == ['b', 'a']
    assert log.count('undo-start:b') == 2 and log.count('undo-start:a') == 1
    b = res.steps[1]
    assert b.undo_state is UndoState.DONE and b.undo_attempts == 2
    idem = rds.hgetall(f'{app.conf.compensate_key_prefix}-t:idem:{res.id}')
    assert idem['b'] == f'{res.id}:1'


@pytest.mark.prefork
def test_an_undo_lost_with_its_worker_is_sent_again_after_the_backoff(
        redis_url):
    """A lost attempt counts as failed and gets a failed attempt's backoff
    (here 3 s), so a worker that keeps dying cannot burn the budget in
    seconds."""
    backoff = 3.0
    with _cluster(redis_url, step_timeout=LEASE, queue_timeout=2 * LEASE,
                  heartbeat_interval=HEARTBEAT, recovery_interval=SWEEP,
                  undo_retry_backoff=backoff,
                  undo_retry_backoff_max=backoff) as (app, rds, start):
        first = start('first')
        res = saga(tasks.do.si('a'), tasks.do.si('b', undo_hang_once=True),
                   tasks.do.si('c', fail=True), app=app).apply_async()
        wait_for(lambda: 'undo-hang:b' in entries(app, rds, res.id),
                 timeout=15)
        first.kill()
        start('second')
        key = get_state(app).store.keys.saga(res.id)
        wait_for(lambda: rds.hget(key, L.attempt(1)) == '2', timeout=15,
                 interval=0.01)
        resent = time.monotonic()
        wait_for(lambda: entries(app, rds, res.id).count('undo-start:b') == 2,
                 timeout=15, interval=0.01)
        assert time.monotonic() - resent >= backoff - 0.5
        assert res.wait(timeout=20) is SagaState.COMPENSATED
        assert undone(entries(app, rds, res.id)) == ['b', 'a']


@pytest.mark.prefork
def test_abort_terminates_the_running_step(cluster):
    """Abort revokes the in-flight step with terminate: it never completes,
    and what completed is compensated."""
    app, rds, start = cluster
    start('only')
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=30), tasks.do.si('c'),
               app=app).apply_async()
    wait_for(lambda: 'start:b' in entries(app, rds, res.id), timeout=15)
    assert res.abort() is True
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    log = entries(app, rds, res.id)
    assert undone(log) == ['a'] and 'do:b' not in log and 'start:c' not in log
    info = res.info()
    assert info.reason == 'aborted: by an operator'
    assert info.steps[1].state is StepState.FAILED


# -- the threads worker, short leases --------------------------------------

@pytest.mark.compensate_conf(**FAST)
def test_a_step_in_a_queue_nobody_consumes_is_recovered(
        celery_app, celery_worker, rds, prefix):
    res = saga(tasks.do.si('a'), tasks.do.si('b').set(queue=f'{prefix}-nobody'),
               tasks.do.si('c')).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['a']
    assert 'lost' in res.steps[1].failure


@pytest.mark.compensate_conf(**{**FAST, 'compensate_queue_timeout': 30})
def test_a_step_that_expired_in_the_broker_compensates(
        celery_app, celery_worker, rds, prefix):
    """b's ``expires`` passes while it waits in a queue nobody consumes yet;
    the worker that then takes it discards it (``task_revoked`` with
    ``expired``): the step fails as ``expired`` and a is undone."""
    park = f'{prefix}-expiring'
    res = saga(tasks.do.si('a'), tasks.do.si('b').set(queue=park, expires=0.3),
               tasks.do.si('c')).apply_async()
    store = get_state(celery_app).store
    wait_for(lambda: rds.hget(store.keys.saga(res.id), L.step_state(1)) == 'R')
    time.sleep(0.5)                 # the fault is the wait: b expires
    celery_worker.consumer.add_task_queue(park)
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    assert res.steps[1].failure == 'expired'
    log = ledger(rds, celery_app, res.id)
    assert undone(log) == ['a'] and 'start:b' not in log


@pytest.mark.compensate_conf(**FAST)
def test_a_live_worker_keeps_a_long_step_alive(celery_app, celery_worker, rds):
    """The step runs 4 leases long; the heartbeat renews its lease, so the
    sweep leaves it alone."""
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=4.0)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPLETED
    log = ledger(rds, celery_app, res.id)
    assert undone(log) == [] and 'do:b' in log


@pytest.mark.compensate_conf(compensate_undo_queue='UNDO_QUEUE', **FAST)
def test_an_undo_whose_message_was_lost_is_sent_again(
        celery_app, celery_worker, rds):
    """The undo's message is lost (and its queue has no consumer yet): its
    lease lapses and it is sent again, each lease; once a worker consumes
    the queue, exactly one copy runs."""
    undo_queue = get_state(celery_app).settings.undo_queue
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    wait_for(lambda: rds.llen(undo_queue) == 1)
    rds.delete(undo_queue)                      # as if the broker lost it
    wait_for(lambda: rds.llen(undo_queue) >= 2, timeout=10)
    celery_worker.consumer.add_task_queue(undo_queue)
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    log = ledger(rds, celery_app, res.id)
    assert undone(log) == ['a'] and log.count('undo-start:a') == 1
    assert res.steps[0].undo_attempts == 1


@pytest.mark.compensate_conf(**{**FAST, 'compensate_step_timeout': 6,
                                'compensate_queue_timeout': 6,
                                'compensate_heartbeat_interval': 2.5})
def test_abort_on_a_threads_worker_undoes_the_late_completer(
        celery_app, celery_worker, rds):
    """A threads pool cannot terminate the running step.  The abort comes
    a moment after b started, before any heartbeat: b was marked held when
    the worker received it, so its stage waits for it; it completes after
    the abort, is undone first, then a; the next link never runs."""
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=1.0),
               tasks.do.si('c')).apply_async()
    wait_for(lambda: 'start:b' in ledger(rds, celery_app, res.id),
             interval=0.005)
    assert res.abort('stock count is wrong') is True
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    log = ledger(rds, celery_app, res.id)
    assert undone(log) == ['b', 'a'], log
    assert log.index('do:b') < log.index('undo-start:a')
    assert 'start:c' not in log
    assert res.info().reason == 'aborted: stock count is wrong'


@pytest.mark.compensate_conf(**FAST)
def test_an_ignored_step_waits_the_queue_timeout(celery_app, celery_worker,
                                                 rds):
    """b runs past a heartbeat (held), then raises ``Ignore`` and nothing
    is published again: released to the queue lease, it is given up when
    no worker took it within the queue timeout, not as a dead worker."""
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=0.5, ignore=True),
               tasks.do.si('c')).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['a']
    assert res.steps[1].failure.startswith(
        'lost: no worker took it from the broker'), res.steps[1].failure


@pytest.mark.compensate_conf(**FAST)
def test_a_step_rejected_with_requeue_runs_again_and_completes(
        celery_app, celery_worker, rds):
    """``Reject(requeue=True)`` (an ``acks_late`` task) sends the same
    message back: it is received (held) again, runs and completes; nothing
    is compensated."""
    res = saga(tasks.do.si('a'), tasks.requeued.si('b', sleep=0.3),
               tasks.do.si('c')).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPLETED, (
        res.info().reason, ledger(rds, celery_app, res.id))
    log = ledger(rds, celery_app, res.id)
    assert log.count('start:b') == 2 and log.count('do:b') == 1
    assert undone(log) == []


@pytest.mark.compensate_conf(**FAST)
def test_a_step_waiting_in_a_rate_limit_bucket_is_held(
        celery_app, celery_worker, rds):
    """Celery keeps a rate-limited request in a token bucket, in none of
    its reserved/scheduled/active sets: the worker still counts it as held
    (renews it), so it is not released to a queue lease that lapses while
    it waits (1.5 s apart here, queue timeout 1 s)."""
    results = [saga(tasks.limited.si(f'l{n}')).apply_async() for n in range(3)]
    assert [r.wait(timeout=15) for r in results] == [SagaState.COMPLETED] * 3


def test_rebuilt_strategies_still_record_receipts(celery_app, celery_worker):
    """``pool_restart`` with ``reload`` rebuilds the consumer's strategies
    without restarting the consumer: they are wrapped again."""
    consumer = celery_worker.consumer
    consumer.update_strategies()
    assert all(getattr(s, '_compensate_receive', False)
               for s in consumer.strategies.values())


def test_abort_of_a_saga_that_is_not_running_changes_nothing(
        celery_app, celery_worker, rds, caplog):
    res = saga(tasks.do.si('a')).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPLETED
    before = rds.hgetall(get_state(celery_app).store.keys.saga(res.id))
    with caplog.at_level(logging.WARNING, logger='celery_compensate.result'):
        assert res.abort() is False
    assert rds.hgetall(get_state(celery_app).store.keys.saga(res.id)) == before
    assert 'not aborted: it is COMPLETED' in caplog.text
    with pytest.raises(SagaNotFound, match='no-such-saga'):
        SagaResult('no-such-saga', app=celery_app).abort()


# -- the sweep itself, step by step (no worker) ------------------------------

def settle(recovery: Recovery) -> int:
    """Sweep at the sweep interval until a sweep is not held (the first
    sweep of a fresh key prefix is: it finds no record of a previous one)."""
    deadline = time.monotonic() + 10
    while True:
        done = recovery.sweep()
        if not recovery.was_held or time.monotonic() > deadline:
            return done
        time.sleep(recovery.settings.recovery_interval)


def _lapse(rds: redis.Redis, store, saga_id: str, index: int = 0) -> None:
    """Make step ``index``'s lease lapse now."""
    rds.hset(store.keys.saga(saga_id), L.deadline(index), 1)
    rds.zadd(store.keys.due(shard_of(saga_id)), {saga_id: 1})


@pytest.mark.compensate_conf(**FAST)
def test_a_long_gap_in_sweeps_is_not_taken_for_dead_workers(
        celery_app, rds, caplog):
    """After Redis was unreachable (no sweep for a while) the sweep holds
    off until live workers had time to renew their leases; it says so once
    per hold, not at every sweep it skips."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do'), UndoSpec('t.undo'), False)]])
    store.create('held', plan)
    _lapse(rds, store, 'held')
    recovery = Recovery(celery_app, store.settings)
    try:
        with caplog.at_level(logging.INFO, logger='celery_compensate'):
            assert recovery.sweep() == 0        # first sweep in a while: held
            assert recovery.was_held
            assert recovery.sweep() == 0        # still held: not said again
        assert caplog.text.count('the sweep starts in') == 1
        store.renew([('held', 0, None)])        # a live worker renews
        assert settle(recovery) == 0            # renewed: nothing due
        assert store.get_state('held') is SagaState.RUNNING
        _lapse(rds, store, 'held')              # now nobody renews
        assert settle(recovery) == 1
        assert store.get_state('held') is SagaState.COMPENSATED
        assert 'lost' in store.read('held').steps[0].failure
    finally:
        recovery.stop()


@pytest.mark.compensate_conf(**FAST)
def test_a_busy_workers_requests_wait_for_their_receipts(celery_app, rds):
    """On a busy worker a request reaches the pool only once its receipt is
    recorded: held back while it waits in the batch, handed over by the
    batch's pipeline; a batch whose timer never fired goes out with the
    next receipt."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do'), UndoSpec('t.undo'), False)]
                             * 3])
    store.create('batch', plan)
    key = store.keys.saga('batch')
    recovery = Recovery(celery_app, store.settings)
    timers: list[Callable[[], None]] = []
    recovery.call_later = lambda delay, fn: timers.append(fn)
    handed: list[str] = []
    try:
        recovery._last_receipt = time.monotonic()       # busy
        first = types.SimpleNamespace(id=step_task_id('batch', 0))
        recovery.receive(first.id, {SAGA_ID: 'batch', STEP: 0})
        assert recovery.hand_over(first, lambda r: handed.append(r.id))
        assert handed == [] and not rds.hexists(key, L.held(0))
        timers.pop()()                                  # the timer fires
        assert handed == [first.id] and rds.hexists(key, L.held(0))
        assert not recovery.hand_over(first, handed.append)   # recorded

        # a timer that never fires: the next receipt sends the batch
        recovery._last_receipt = time.monotonic()
        second = types.SimpleNamespace(id=step_task_id('batch', 1))
        recovery.receive(second.id, {SAGA_ID: 'batch', STEP: 1})
        assert recovery.hand_over(second, lambda r: handed.append(r.id))
        time.sleep(STALE_BATCH)             # the fault: time passes
        recovery.receive(step_task_id('batch', 2), {SAGA_ID: 'batch',
                                                    STEP: 2})
        assert handed == [first.id, second.id]
        assert rds.hexists(key, L.held(1))
    finally:
        recovery.stop()


@pytest.mark.compensate_conf(**FAST)
def test_a_task_received_a_moment_ago_is_not_taken_for_gone(celery_app, rds):
    """The consumer records the receipt, then Celery registers the request:
    a heartbeat in between must not take the task for one that left the
    worker (and put it back under the queue lease)."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do'), UndoSpec('t.undo'), False)]])
    store.create('fresh', plan)
    recovery = Recovery(celery_app, store.settings)
    key = store.keys.saga('fresh')
    try:
        recovery.receive(step_task_id('fresh', 0), {SAGA_ID: 'fresh', STEP: 0})
        recovery.send_receipts()
        holder = rds.hget(key, L.held(0))
        assert holder
        recovery.renew()        # no request registered in this process yet
        assert rds.hget(key, L.held(0)) == holder
        recovery.renew(last=True)   # a worker exiting: it left for good
        assert rds.hget(key, L.held(0)) is None
    finally:
        recovery.stop()


@pytest.mark.compensate_conf(**FAST)
def test_a_step_that_ended_before_its_receipt_still_confirms_its_stage(
        celery_app, rds):
    """On a busy worker a fast step can end before its queued receipt goes
    out (the receipt answers DONE): its success still confirms the stage
    it dispatched, or the sweep would publish that stage again."""
    from celery.worker import state as worker_state
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do'), UndoSpec('t.undo'), False)],
                             [(TaskRef('t.do'), UndoSpec('t.undo'), False)]])
    store.create('fast', plan)
    store.step_done('fast', 0, '"ra"')          # b in the outbox
    key = store.keys.saga('fast')
    assert rds.hget(key, L.outbox(1)) == '1'
    recovery = Recovery(celery_app, store.settings)
    task_id = step_task_id('fast', 0)
    worker_state.successful_requests.add(task_id)
    try:
        recovery._last_receipt = time.monotonic()   # busy: queued
        recovery.receive(task_id, {SAGA_ID: 'fast', STEP: 0})
        recovery.send_receipts()                    # answers DONE
        recovery.renew(last=True)
        assert rds.hget(key, L.outbox(1)) is None   # confirmed
    finally:
        worker_state.successful_requests.discard(task_id)
        recovery.stop()


@pytest.mark.compensate_conf(**FAST)
def test_a_slow_store_turns_receipts_from_the_event_loop_off(
        celery_app, rds, monkeypatch):
    """A receipt sent from the consumer's event loop that took more than a
    few milliseconds turns them off for a heartbeat: the next ones are
    queued for the receipts thread, so a slow store cannot hold up the
    consumer message after message."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do'), UndoSpec('t.undo'), False)]])
    for sid in ('slow1', 'slow2'):
        store.create(sid, plan)
    recovery = Recovery(celery_app, store.settings)
    original = recovery.quick.receive_many

    def slow(items):
        time.sleep(0.05)
        return original(items)

    monkeypatch.setattr(recovery.quick, 'receive_many', slow)
    try:
        recovery.receive(step_task_id('slow1', 0), {SAGA_ID: 'slow1', STEP: 0})
        assert not recovery._receipts               # sent at once
        recovery._last_receipt = float('-inf')      # not busy: only slow
        recovery.receive(step_task_id('slow2', 0), {SAGA_ID: 'slow2', STEP: 0})
        assert len(recovery._receipts) == 1         # queued instead
    finally:
        recovery.stop()


@pytest.mark.compensate_conf(**FAST)
def test_a_corrupt_record_is_quarantined_and_the_others_recovered(
        celery_app, rds, caplog):
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do', ('a',)), UndoSpec('t.undo'),
                               True)]])
    for sid in ('good', 'bad'):
        store.create(sid, plan)
        _lapse(rds, store, sid)
    rds.hset(store.keys.saga('bad'), L.spec(0), '{"index": 0, "trunc')
    recovery = Recovery(celery_app, store.settings)
    try:
        with caplog.at_level(logging.ERROR):
            settle(recovery)
    finally:
        recovery.stop()
    assert store.get_state('good') is SagaState.COMPENSATING  # undo sent
    assert rds.zscore(store.keys.bad(shard_of('bad')), 'bad')
    assert rds.zscore(store.keys.due(shard_of('bad')), 'bad') is None
    assert 'saga bad: the sweep cannot process it' in caplog.text
    # nothing recorded was lost: the record is still there to repair
    assert rds.hget(store.keys.saga('bad'), L.spec(0)) == '{"index": 0, "trunc'
    rds.delete(store.keys.bad(shard_of('bad')))


@pytest.mark.compensate_conf(**FAST)
def test_a_sweep_acts_on_the_due_sagas_only(celery_app, rds):
    """The deadline index hands the sweep only the sagas whose leases
    lapsed, however many others are stored."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do', ('a',)), None, False)]])
    for n in range(300):
        store.create(f'busy-{n}', plan)
    store.create('due', plan)
    _lapse(rds, store, 'due')
    recovery = Recovery(celery_app, store.settings)
    acted: list[str] = []
    original = recovery.coordinator.recover
    recovery.coordinator.recover = lambda sid: acted.append(sid) or original(sid)
    try:
        assert settle(recovery) == 1
    finally:
        recovery.stop()
    assert acted == ['due']
    assert store.get_state('busy-0') is SagaState.RUNNING


@pytest.mark.prefork
def test_a_worker_without_recovery_renews_but_does_not_sweep(cluster):
    """``--without-compensate-recovery``: the worker keeps its own long step
    alive, but leaves a lapsed saga to other workers."""
    app, rds, start = cluster
    store = get_state(app).store
    start('quiet', '--without-compensate-recovery')
    plan = Plan.from_stages([[(TaskRef('t.do', ('x',)), None, False)]])
    store.create('orphan', plan)
    _lapse(rds, store, 'orphan')
    res = saga(tasks.do.si('a', sleep=LEASE * 2), app=app).apply_async()
    assert res.wait(timeout=20) is SagaState.COMPLETED
    assert store.get_state('orphan') is SagaState.RUNNING
    assert not rds.exists(store.keys.lock())


@pytest.mark.prefork
def test_a_warm_shutdown_keeps_renewing_until_its_tasks_finish(cluster):
    """SIGTERM: the worker stops sweeping at once but finishes the step it
    runs (4 leases long) and keeps its lease alive meanwhile."""
    app, rds, start = cluster
    first = start('first')
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=LEASE * 2),
               app=app).apply_async()
    wait_for(lambda: 'start:b' in entries(app, rds, res.id), timeout=15)
    start('second')
    first.proc.send_signal(signal.SIGTERM)  # the main process, as systemd
    assert res.wait(timeout=20) is SagaState.COMPLETED
    assert undone(entries(app, rds, res.id)) == []
    first.proc.wait(20)


@pytest.mark.compensate_conf(**FAST)
def test_a_redis_stall_longer_than_a_lease_is_not_a_dead_worker(
        celery_app, celery_worker, rds):
    """Redis accepts no writes for 1.5 leases while a step runs: nobody can
    renew, but the sweep sees the gap and waits for the renewals."""
    res = saga(tasks.do.si('a'), tasks.do.si('b', sleep=3.0)).apply_async()
    wait_for(lambda: 'start:b' in ledger(rds, celery_app, res.id))
    store = get_state(celery_app).store
    wait_for(lambda: rds.hget(store.keys.saga(res.id), L.held(1)))  # held
    rds.execute_command('CLIENT', 'PAUSE', 1500, 'WRITE')
    assert res.wait(timeout=15) is SagaState.COMPLETED
    assert undone(ledger(rds, celery_app, res.id)) == []


@pytest.mark.compensate_conf(**FAST)
def test_abort_leaves_a_held_step_running_until_it_ends(celery_app, rds):
    """A step a worker holds is revoked, not given up: the undo of a
    compensate_on_failure step must not run while its effect may still
    land.  A resent abort (reply lost) revokes it again."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do', ('a',)), UndoSpec('t.undo'),
                               False)],
                             [(TaskRef('t.do', ('b',)), UndoSpec('t.undo'),
                               True)]])
    store.create('ab', plan)
    store.step_done('ab', 0, '"ra"')
    store.renew([('ab', 1, None)])              # a worker holds step b
    first = store.abort('ab', 'aborted: test', token='tok')
    again = store.abort('ab', 'aborted: test', token='tok')
    assert first.stopped == again.stopped == [1]
    assert first.undos == [] and store.read('ab').steps[1].state == 'R'
    revoked = store.step_failed('ab', 1, 'revoked (terminated by SIGTERM)')
    assert [d.step.index for d in revoked.undos] == [1]   # now b, then a
    assert store.abort('ab', 'x').status == 'not-running'


@pytest.mark.compensate_conf(**FAST)
def test_a_record_with_nothing_in_flight_is_quarantined(celery_app, rds):
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do', ('a',)), None, False)],
                             [(TaskRef('t.do', ('b',)), None, False)]])
    store.create('limbo', plan)
    rds.hset(store.keys.saga('limbo'), L.step_state(0), 'D')     # recorded, never advanced
    rds.zadd(store.keys.due(shard_of('limbo')), {'limbo': 1})
    recovery = Recovery(celery_app, store.settings)
    try:
        settle(recovery)
    finally:
        recovery.stop()
    assert rds.zscore(store.keys.bad(shard_of('limbo')), 'limbo')
    assert rds.zscore(store.keys.due(shard_of('limbo')), 'limbo') is None
    rds.delete(store.keys.bad(shard_of('limbo')))


# -- the saga store unreachable at an undo's edges ---------------------------

def _flaky(store, name: str, monkeypatch, times: int = 1) -> list[int]:
    """Make ``store.<name>`` raise SagaStoreUnavailable ``times`` times."""
    from celery_compensate import SagaStoreUnavailable
    calls: list[int] = []
    original = getattr(store, name)

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise SagaStoreUnavailable('saga store unreachable (test)')
        return original(*args, **kwargs)

    monkeypatch.setattr(store, name, flaky)
    return calls


@pytest.mark.compensate_conf(**FAST)
def test_an_undo_that_cannot_begin_while_redis_is_away_runs_later(
        celery_app, celery_worker, rds, monkeypatch):
    """undo_begin cannot reach the store: the copy is sent again after a
    heartbeat (no attempt spent), then runs."""
    calls = _flaky(get_state(celery_app).store, 'undo_begin', monkeypatch)
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    assert len(calls) >= 2
    assert res.steps[0].undo_attempts == 1
    assert undone(ledger(rds, celery_app, res.id)) == ['a']


@pytest.mark.compensate_conf(compensate_record_retry_timeout=0.2, **FAST)
def test_an_undo_done_while_redis_stays_away_is_run_again(
        celery_app, celery_worker, rds, monkeypatch):
    """The undo succeeded but its success cannot be recorded within
    compensate_record_retry_timeout: the attempt's lease lapses, the sweep
    counts it lost and sends the next one, under the same idempotency
    key, whose success is recorded."""
    store = get_state(celery_app).store
    calls = _flaky(store, 'undo_done', monkeypatch, times=3)
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert res.steps[0].undo_attempts == 2
    log = ledger(rds, celery_app, res.id)
    assert log.count('undo-start:a') == 2
    idem = rds.hgetall(f'{celery_app.conf.compensate_key_prefix}-t:idem:'
                       f'{res.id}')
    assert idem['a'] == f'{res.id}:0'
    assert len(calls) >= 4


@pytest.mark.compensate_conf(compensate_undo_queue='UNDO_QUEUE', **FAST)
def test_an_undo_whose_publish_fails_is_sent_again_by_the_sweep(
        celery_app, celery_worker, rds, monkeypatch):
    """The broker refuses the undo's message (after Celery's own publish
    retries): no attempt is spent, it stays queued in the record, and the
    sweep sends it when its lease lapses."""
    from kombu.exceptions import OperationalError
    from celery_compensate.coordinator import Coordinator
    failures: list[int] = []
    original = Coordinator.publish_undo

    def publish_undo(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise OperationalError('broker down (test)')
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Coordinator, 'publish_undo', publish_undo)
    celery_worker.consumer.add_task_queue(
        get_state(celery_app).settings.undo_queue)
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    assert failures == [1] and res.steps[0].undo_attempts == 1
    assert undone(ledger(rds, celery_app, res.id)) == ['a']
