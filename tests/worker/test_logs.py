"""One log line per saga transition, at its level, naming the saga."""
from __future__ import annotations

import logging
import re

import pytest

from celery_compensate import SagaState, saga

from .. import tasks
from ..helpers import wait_for

#: a transition line: ``saga <id>: <NEW STATE>[ again]: ...``
LINE = re.compile(r'^saga (\S+): (RUNNING|COMPLETED|COMPENSATING|COMPENSATED'
                  r'|COMPENSATION_FAILED)\b')


def transitions(caplog, saga_id: str) -> list[tuple[str, str, str]]:
    """(level, state, message) of the transition lines of one saga."""
    out = []
    for rec in caplog.records:
        m = LINE.match(rec.getMessage())
        if m and m.group(1) == saga_id:
            out.append((rec.levelname, m.group(2), rec.getMessage()))
    return out


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_each_transition_logs_one_line_at_its_level(
        celery_app, celery_worker, rds, caplog):
    caplog.set_level(logging.INFO, logger='celery_compensate')
    ok = saga(tasks.do.si('a'), tasks.do.si('b')).apply_async()
    bad = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    rds.set(tasks.countdown_key(celery_app, 'logs-cf', 'a'), 100)
    cf = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async(
        saga_id='logs-cf')
    assert ok.wait(timeout=15) is SagaState.COMPLETED
    assert bad.wait(timeout=15) is SagaState.COMPENSATED
    assert cf.wait(timeout=15) is SagaState.COMPENSATION_FAILED
    rds.delete(tasks.countdown_key(celery_app, 'logs-cf', 'a'))
    assert cf.retry()
    assert cf.wait(timeout=15) is SagaState.COMPENSATED
    # a final line is logged just after its state is stored: wait for it
    wait_for(lambda: [len(transitions(caplog, r.id)) for r in (ok, bad, cf)]
             == [2, 3, 5])

    assert [t[:2] for t in transitions(caplog, ok.id)] == [
        ('INFO', 'RUNNING'), ('INFO', 'COMPLETED')]
    lines = transitions(caplog, bad.id)
    assert [t[:2] for t in lines] == [
        ('INFO', 'RUNNING'), ('WARNING', 'COMPENSATING'),
        ('INFO', 'COMPENSATED')]
    assert 'step 1 failed: ValueError: b failed on purpose' in lines[1][2]
    lines = transitions(caplog, cf.id)
    assert [t[:2] for t in lines] == [
        ('INFO', 'RUNNING'), ('WARNING', 'COMPENSATING'),
        ('ERROR', 'COMPENSATION_FAILED'), ('WARNING', 'COMPENSATING'),
        ('INFO', 'COMPENSATED')]
    # the reason: which undo failed, how often, and its last error
    assert ('undo of step 0 failed 2 times, last error: RuntimeError: undo '
            'of a failed on purpose') in lines[2][2]
    assert 'COMPENSATING again: retried by an operator' in lines[3][2]
