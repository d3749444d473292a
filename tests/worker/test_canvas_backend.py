"""A saga where Celery takes a signature and needs a result backend to
call it: a chord's body, and a link carried in a message sent by name
(``app.send_task``), both rebuilt from their dict by the worker."""
from __future__ import annotations

import pytest

from celery import chord, group

from celery_compensate import SagaCompensated, SagaResult, SagaState, saga

from .. import tasks
from ..helpers import ledger, undone


@pytest.fixture
def celery_config(redis_url: str, prefix: str) -> dict:
    """The session's settings plus a Redis result backend whose keys carry
    the test's prefix (the ``rds`` fixture deletes them)."""
    return {
        'broker_url': redis_url,
        'broker_connection_retry_on_startup': True,
        'worker_hijack_root_logger': False,
        'result_backend': redis_url,
        'result_backend_transport_options': {
            'global_keyprefix': f'{prefix}-'},
        'compensate_undo_retry_backoff': 0.05,
        'compensate_undo_retry_backoff_max': 0.2,
    }


def test_a_saga_as_a_chords_body_gets_the_headers_results(
        celery_app, celery_worker, rds):
    body = saga(tasks.do.s(), tasks.do.si('b'))
    handle = chord(group(tasks.plain.s('x'), tasks.plain.s('y')), body)()
    assert isinstance(handle, SagaResult)
    assert handle.get(timeout=15) == 'res-b'
    done = [e for e in ledger(rds, celery_app, handle.id)
            if e.startswith('do:')]
    assert done == ["do:['res-x', 'res-y']", 'do:b']


def test_a_saga_as_a_chords_body_compensates(celery_app, celery_worker, rds):
    body = saga(tasks.do.si('a'), tasks.do.si('b', fail=True))
    handle = chord([tasks.plain.s('x')], body)()
    with pytest.raises(SagaCompensated):
        handle.get(timeout=15)
    log = ledger(rds, celery_app, handle.id)
    assert undone(log) == ['a'] and handle.parent.get(timeout=5) == ['res-x']


def test_a_saga_linked_to_a_task_sent_by_name(celery_app, celery_worker, rds):
    """``send_task`` carries the saga as its dict in the message; the worker
    rebuilds a saga from it (not a plain signature) and starts it with the
    task's result."""
    sg = saga(tasks.do.s(), tasks.do.si('b'))
    handle = sg.freeze()
    sent = celery_app.send_task('t.plain', args=('p',), link=sg)
    assert sent.get(timeout=15) == 'res-p'
    assert handle.get(timeout=15) == 'res-b'
    assert handle.state is SagaState.COMPLETED
    done = [e for e in ledger(rds, celery_app, handle.id)
            if e.startswith('do:')]
    assert done == ['do:res-p', 'do:b']
