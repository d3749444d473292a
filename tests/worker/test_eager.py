"""A saga run in the calling process: ``Saga.apply()`` and
``task_always_eager``, a test convenience against a real Redis store (no
worker, by design: eager mode is what it tests)."""
from __future__ import annotations

import pytest

from celery_compensate import SagaCompensated, SagaState, saga

from .. import tasks
from ..helpers import ledger, undone


def test_apply_runs_a_long_saga_without_recursion(celery_app, rds):
    """300 stages, each run after the record that made it due: no
    RecursionError (each stage used to nest a call)."""
    res = saga(*[tasks.do.si(f's{n}') for n in range(300)]).apply()
    assert res.state is SagaState.COMPLETED
    assert res.get(timeout=0) == 'res-s299'
    done = [e for e in ledger(rds, celery_app, res.id) if e.startswith('do:')]
    assert done == [f'do:s{n}' for n in range(300)]


@pytest.mark.parametrize('fail_at', [0, 1, 2])
def test_apply_compensates_in_reverse_at_once(celery_app, rds, fail_at):
    names = ['a', 'b', 'c']
    res = saga(*[tasks.do.si(n, fail=(i == fail_at))
                 for i, n in enumerate(names)]).apply()
    assert res.state is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == list(
        reversed(names[:fail_at]))
    with pytest.raises(SagaCompensated):
        res.get(timeout=0)


@pytest.mark.compensate_conf(task_always_eager=True)
def test_always_eager_apply_async_runs_the_saga_to_its_end(celery_app, rds):
    res = saga(tasks.do.si('a'), tasks.do.si('b'),
               tasks.do.si('c', fail=True)).apply_async()
    assert res.state is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['b', 'a']


@pytest.mark.compensate_conf(task_always_eager=True)
def test_always_eager_runs_a_long_saga_iteratively(celery_app, rds):
    res = saga(*[tasks.do.si(f's{n}') for n in range(300)]).apply_async()
    assert res.state is SagaState.COMPLETED
    assert res.get(timeout=0) == 'res-s299'


@pytest.mark.parametrize('fail', [None, 'c', 'd'])
def test_apply_runs_a_nested_saga(celery_app, rds, fail):
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), tasks.do.si('c', fail=fail == 'c')),
               tasks.do.si('d', fail=fail == 'd')).apply()
    entries = ledger(rds, celery_app, res.id)
    if fail is None:
        assert res.state is SagaState.COMPLETED
        assert res.children[0].state is SagaState.COMPLETED
        assert undone(entries) == []
        return
    assert res.state is SagaState.COMPENSATED
    assert res.children[0].state is SagaState.COMPENSATED
    assert undone(entries) == (['b', 'a'] if fail == 'c'
                               else ['c', 'b', 'a'])
