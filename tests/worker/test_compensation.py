"""Compensation through a real Redis and a real (threads) worker: every
failure position of a 3-step chain, a chain with a parallel stage, nested
chains, and what undos are called with."""
from __future__ import annotations

import pytest
from celery import chain, chord, group

from celery_compensate import SagaState, saga

from .. import tasks
from ..helpers import (
    assert_one_after_another, assert_stage_order, ledger, undone,
)


@pytest.mark.parametrize('fail_at', [None, 0, 1, 2])
def test_three_step_chain_every_failure_position(
        celery_app, celery_worker, rds, fail_at):
    names = ['a', 'b', 'c']
    res = saga(*[tasks.do.si(n, fail=(i == fail_at))
                 for i, n in enumerate(names)]).apply_async()
    state = res.wait(timeout=15)
    entries = ledger(rds, celery_app, res.id)
    if fail_at is None:
        assert state is SagaState.COMPLETED
        assert undone(entries) == []
        return
    assert state is SagaState.COMPENSATED
    # exactly the completed steps, once each, in reverse order
    assert undone(entries) == list(reversed(names[:fail_at]))
    assert_one_after_another(entries, list(reversed(names[:fail_at])))
    # nothing ran after the failing step
    assert not any(e == f'start:{n}' for n in names[fail_at + 1:] for e in entries)


@pytest.mark.parametrize('fail', [None, 'a', 'b2', 'c'])
def test_chain_with_parallel_stage(celery_app, celery_worker, rds, fail):
    res = saga(
        tasks.do.si('a', fail=fail == 'a'),
        group(tasks.do.si('b1'), tasks.do.si('b2', fail=fail == 'b2'),
              tasks.do.si('b3')),
        tasks.do.si('c', fail=fail == 'c'),
    ).apply_async()
    state = res.wait(timeout=15)
    entries = ledger(rds, celery_app, res.id)
    if fail is None:
        assert state is SagaState.COMPLETED
        assert undone(entries) == []
        return
    assert state is SagaState.COMPENSATED
    expected = {'a': set(), 'b2': {'b1', 'b3', 'a'},
                'c': {'b1', 'b2', 'b3', 'a'}}[fail]
    got = undone(entries)
    assert sorted(got) == sorted(expected)  # each exactly once
    if fail != 'a':
        assert got[-1] == 'a'
        assert_stage_order(entries, expected - {'a'}, {'a'})


def test_parallel_stage_undos_run_in_parallel(celery_app, celery_worker, rds):
    res = saga(
        tasks.do.si('a'),
        group(tasks.do.si('p1', undo_sleep=0.4), tasks.do.si('p2', undo_sleep=0.4)),
        tasks.do.si('c', fail=True),
    ).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    first_end = min(entries.index("undo:p1:'res-p1'"), entries.index("undo:p2:'res-p2'"))
    # both undos of the stage started before either finished
    assert entries.index('undo-start:p1') < first_end
    assert entries.index('undo-start:p2') < first_end
    assert_stage_order(entries, {'p1', 'p2'}, {'a'})


@pytest.mark.parametrize('fail_at', [1, 2, 3])
def test_nested_chains(celery_app, celery_worker, rds, fail_at):
    names = ['a', 'b', 'c', 'd']
    s = [tasks.do.si(n, fail=(i == fail_at)) for i, n in enumerate(names)]
    res = saga(chain(s[0], chain(s[1], chain(s[2]))), s[3]).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert undone(entries) == list(reversed(names[:fail_at]))
    assert_one_after_another(entries, list(reversed(names[:fail_at])))


def test_chord_is_a_parallel_stage_then_its_body(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'),
               chord([tasks.do.si('b1'), tasks.do.si('b2')],
                     tasks.do.si('c', fail=True))).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    got = undone(ledger(rds, celery_app, res.id))
    assert sorted(got[:2]) == ['b1', 'b2'] and got[2:] == ['a']


def test_results_pass_along_like_a_chain(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'), tasks.chained.s('b'),
               group(tasks.do.si('g1'), tasks.do.si('g2')),
               tasks.chained.s('c', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert "do:b:'res-a'" in entries
    assert "do:c:['res-g1', 'res-g2']" in entries
    # the mutable undo gets the result, then the step's args as called
    assert "undo:res-a:'res-b'" in entries
    steps = res.steps
    assert [s.result for s in steps[:4]] == ['res-a', 'res-b', 'res-g1', 'res-g2']
    assert [s.state.name for s in steps] == ['DONE'] * 4 + ['FAILED']


def test_undo_arguments(celery_app, celery_worker, rds):
    """Mutable undo: (result, *step args, **step kwargs); immutable .si():
    exactly its own; a per-call .set(compensate_with=...) overrides."""
    res = saga(
        tasks.do.si('a', extra=1),
        tasks.do.si('b').set(compensate_with=tasks.release.si('fixed', n=2)),
        tasks.plain.si('c').set(compensate_with=tasks.release.s('x')),
        tasks.do.si('d', fail=True),
    ).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert "release:['res-c', 'c', 'x']:{}" in entries
    assert "release:['fixed']:{'n': 2}" in entries
    assert "undo:a:'res-a'" in entries
    assert "undo:b:'res-b'" not in entries  # overridden


def test_steps_without_undo_and_first_step_failing(celery_app, celery_worker, rds):
    res = saga(tasks.plain.si('a'), tasks.plain.si('b', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    first = saga(tasks.do.si('x', fail=True), tasks.do.si('y')).apply_async()
    assert first.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, first.id)) == []
    assert 'start:y' not in ledger(rds, celery_app, first.id)


def test_compensate_on_failure_undoes_the_failing_step_with_none(
        celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'), tasks.self_undo.si('s')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert undone(entries) == ['s', 'a']
    assert 'undo:s:None' in entries


def test_custom_base_class_with_its_own_call(celery_app, celery_worker, rds):
    res = saga(tasks.audited.si('a'), tasks.audited.si('b', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert entries.count('audit') == 2 and undone(entries) == ['a']


def test_delay_prepends_args_to_the_first_step(celery_app, celery_worker, rds):
    res = saga(tasks.do.s(), tasks.do.si('b', fail=True)).delay('first')
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['first']


def test_delay_merges_kwargs_into_the_first_step(celery_app, celery_worker, rds):
    res = saga(tasks.do.s(), tasks.do.si('b')).delay('x', fail=True)
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert 'fail:x' in entries and 'start:b' not in entries
