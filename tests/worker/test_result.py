"""``SagaResult`` reads like Celery's ``AsyncResult``: against a real Redis
and a real worker."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from celery import group

from celery_compensate import (
    InvalidSaga, SagaCompensated, SagaCompensationFailed, SagaNotFinished,
    SagaNotFound, SagaResult, SagaState, SagaTimeoutError, saga,
)

from .. import tasks


def test_get_returns_the_last_steps_result(celery_app, celery_worker):
    before = datetime.now(timezone.utc)
    res = saga(tasks.do.si('a'), tasks.do.si('b')).apply_async()
    assert res.get(timeout=15) == 'res-b'
    assert res.ready() and res.successful() and not res.failed()
    assert res.status is res.state is SagaState.COMPLETED
    assert res.result == 'res-b' and res.traceback is None
    assert before <= res.date_done <= datetime.now(timezone.utc)


def test_a_parallel_last_stage_gives_a_list(celery_app, celery_worker):
    res = saga(tasks.do.si('a'),
               group(tasks.do.si('b1'), tasks.do.si('b2'))).apply_async()
    assert res.get(timeout=15) == ['res-b1', 'res-b2']


def test_get_raises_when_the_saga_was_compensated(celery_app, celery_worker):
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    with pytest.raises(SagaCompensated) as caught:
        res.get(timeout=15)
    exc = caught.value
    assert (exc.saga_id, exc.state, exc.failed_step) == (
        res.id, 'COMPENSATED', 1)
    assert exc.error == exc.reason == 'ValueError: b failed on purpose'
    assert str(exc) == (f'saga {res.id} COMPENSATED (step 1 failed): '
                        'ValueError: b failed on purpose')
    assert res.failed() and not res.successful()
    assert isinstance(res.get(propagate=False), SagaCompensated)
    assert res.traceback == 'ValueError: b failed on purpose'


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_get_raises_when_compensation_failed(celery_app, celery_worker, rds):
    sid = 'get-cf-' + celery_app.conf.compensate_key_prefix
    rds.set(tasks.countdown_key(celery_app, sid, 'a'), 100)   # never undone
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async(
        saga_id=sid)
    with pytest.raises(SagaCompensationFailed) as caught:
        res.get(timeout=15)
    assert caught.value.failed_step == 1
    assert not isinstance(caught.value, SagaCompensated)
    assert res.failed()


def test_get_times_out(celery_app, celery_worker):
    res = saga(tasks.do.si('a', sleep=3)).apply_async()
    started = time.monotonic()
    with pytest.raises(SagaTimeoutError):
        res.get(timeout=0.3, interval=0.05)
    assert time.monotonic() - started < 2
    assert not res.ready() and res.result is None and res.date_done is None
    assert res.get(timeout=15) == 'res-a'


def test_forget_deletes_a_finished_saga_only(celery_app, celery_worker):
    running = saga(tasks.do.si('a', sleep=1)).apply_async()
    with pytest.raises(SagaNotFinished, match='RUNNING'):
        running.forget()
    assert running.get(timeout=15) == 'res-a'
    running.forget()
    with pytest.raises(SagaNotFound):
        running.state
    with pytest.raises(SagaNotFound):
        running.forget()
    store = running._store
    assert running.id not in {e.saga_id for e in store.list_sagas(limit=100)}


def test_an_invalid_id_is_refused_by_name(celery_app):
    with pytest.raises(InvalidSaga, match="'bad id!'"):
        SagaResult('bad id!', app=celery_app)
