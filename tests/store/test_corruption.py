"""Bad input and corruption met by running sagas: a damaged record, an
unknown step, an unknown saga, Redis stalling mid-undo.  Each gets a clear
error or a clean retry, the other sagas carry on, and nothing recorded is
lost (docs/semantics.rst, "Bad input and corruption")."""
from __future__ import annotations

import logging
import time

import pytest

from celery_compensate import (
    CorruptSagaRecord, SagaResult, SagaState, saga,
)
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskIdInfo, TaskRef, UndoSpec
from celery_compensate.store import new_token
from celery_compensate.store import layout as L

from .. import tasks
from ..helpers import ledger, wait_for
from ..helpers import undone

#: step a (undone by t.undo), then step b (no undo)
A_THEN_B = Plan.from_stages([
    [(TaskRef('t.do', ('a',)), UndoSpec('t.undo'), False)],
    [(TaskRef('t.do', ('b',)), None, False)]])

FAST = dict(compensate_step_timeout=1.0, compensate_queue_timeout=1.0,
            compensate_heartbeat_interval=0.2,
            compensate_recovery_interval=0.2)


@pytest.mark.compensate_conf(**FAST)
def test_a_truncated_step_spec_fails_only_its_own_saga(
        celery_app, celery_worker, rds, caplog):
    """Saga A's next step spec is truncated while step a runs: a is
    recorded, the next stage cannot be decoded (an error names the saga),
    its lease lapses and the sweep compensates A.  Saga B never notices."""
    store = get_state(celery_app).store
    a = saga(tasks.do.si('a', sleep=0.3), tasks.do.si('b')).apply_async()
    rds.hset(store.keys.saga(a.id), L.spec(1), '{"index": 1, "sta')
    b = saga(tasks.do.si('a'), tasks.do.si('b')).apply_async()
    with caplog.at_level(logging.ERROR):
        assert b.wait(timeout=10) is SagaState.COMPLETED
        assert a.wait(timeout=10) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, a.id)) == ['a']
    assert f"saga {a.id!r}: a saga record holds a step that cannot be " \
        'decoded' in caplog.text
    assert rds.hget(store.keys.saga(a.id), L.spec(1)) == '{"index": 1, "sta'  # kept
    with pytest.raises(CorruptSagaRecord, match=a.id):
        a.info()


def test_an_unknown_state_is_a_corrupt_record(celery_app, rds):
    store = get_state(celery_app).store
    store.create('odd', Plan.from_stages([[(TaskRef('t.do', ('a',)), None,
                                            False)]]))
    rds.hset(store.keys.saga('odd'), L.STATE, 'HALF_DONE')
    res = SagaResult('odd', app=celery_app)
    with pytest.raises(CorruptSagaRecord, match="'odd' has an unknown state "
                                                "'HALF_DONE'"):
        res.state  # noqa: B018 - the read raises
    with pytest.raises(CorruptSagaRecord, match='odd'):
        res.info()


def test_unknown_steps_and_sagas_are_ignored_with_a_warning(
        celery_app, celery_worker, rds, caplog):
    """A message with a saga task id whose step or saga does not exist (a
    stale, forged or expired one) runs as a plain task and changes
    nothing."""
    res = saga(tasks.do.si('a', sleep=0.5), tasks.do.si('b')).apply_async()
    with caplog.at_level(logging.WARNING, logger='celery_compensate'):
        tasks.do.apply_async(('x',), task_id=f'{res.id}.s99')
        tasks.do.apply_async(('y',), task_id='no-such-saga.s0')
        wait_for(lambda: 'no such saga in the store' in caplog.text)
        wait_for(lambda: 'the saga has no such step' in caplog.text)
    assert res.wait(timeout=10) is SagaState.COMPLETED
    assert f'saga {res.id}: step 99 ignored' in caplog.text
    assert 'saga no-such-saga: step 0 ignored' in caplog.text


@pytest.mark.compensate_conf(compensate_redis_socket_timeout=0.2,
                             compensate_record_retry_timeout=10)
def test_a_finished_undo_is_recorded_through_a_redis_stall(celery_app, rds):
    """Redis stalls while a finished undo is recorded: the same call is
    resent until Redis answers; the undo is not counted as failed."""
    state = get_state(celery_app)
    store = state.store
    plan = A_THEN_B
    store.create('stall', plan)
    store.step_done('stall', 0, '"ra"')
    store.step_failed('stall', 1, 'boom')
    assert store.undo_begin('stall', 0, 1, new_token()) == 'run'
    token = new_token()
    rds.execute_command('CLIENT', 'PAUSE', 2500, 'WRITE')
    outcome = state.coordinator.persist(
        lambda: store.undo_done('stall', 0, token),
        TaskIdInfo('stall', 0, True, 1), 'the undo of step')
    assert outcome.status == 'undone'
    assert outcome.new_state is SagaState.COMPENSATED
    assert store.read('stall').steps[0].undo_attempts == 1


@pytest.mark.compensate_conf(compensate_heartbeat_interval=0.2)
def test_a_pre_check_that_cannot_reach_redis_retries_the_step(
        celery_app, celery_worker, rds, monkeypatch):
    """A message that must check the record first (redelivered, or late)
    while Redis is unreachable is sent again later: the body neither runs
    unchecked nor counts as a failure."""
    from celery_compensate import SagaStoreUnavailable, worker
    store = get_state(celery_app).store
    calls: list[tuple] = []
    original = store.step_status

    def flaky(*args):
        calls.append(args)
        if len(calls) == 1:
            raise SagaStoreUnavailable('saga store unreachable (test)')
        return original(*args)

    monkeypatch.setattr(worker, '_may_be_settled',
                        lambda state, req: ('test', 1))
    monkeypatch.setattr(store, 'step_status', flaky)
    res = saga(tasks.do.si('a'), tasks.do.si('b')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPLETED
    log = ledger(rds, celery_app, res.id)
    assert log.count('start:a') == 1 and undone(log) == []
    assert len(calls) >= 3          # a twice (the retry), then b


@pytest.mark.compensate_conf(compensate_record_retry_timeout=10)
def test_a_full_redis_is_waited_out_like_an_outage(celery_app, rds):
    """OOM under noeviction (as READONLY during a failover) is retried like
    a lost connection: the completed step is recorded once Redis has room."""
    import threading

    from celery_compensate.store import new_token
    state = get_state(celery_app)
    store = state.store
    plan = A_THEN_B
    store.create('full', plan)
    before = rds.config_get('maxmemory*')
    rds.config_set('maxmemory-policy', 'noeviction')
    rds.config_set('maxmemory', 1)
    timer = threading.Timer(1.0, rds.config_set, ('maxmemory',
                                                  before['maxmemory']))
    timer.start()
    token = new_token()
    started = time.monotonic()
    try:
        outcome = state.coordinator.persist(
            lambda: store.step_done('full', 0, '"ra"', token),
            TaskIdInfo('full', 0, False), 'the completion of step')
    finally:
        timer.join()
        rds.config_set('maxmemory', before['maxmemory'])
        rds.config_set('maxmemory-policy', before['maxmemory-policy'])
    assert time.monotonic() - started > 0.8    # it waited for the room
    assert outcome.status == 'next'
    assert store.read('full').steps[0].state == 'D'
