"""Nested sagas through a real Redis and a real (threads) worker: a saga as
a step (or a parallel member) of another, with its own id and record; a
failed child compensates itself first; a completed child is undone as a
unit before its parent's earlier steps; abort and retry across the
boundary; the depth limit."""
from __future__ import annotations

import pytest
from celery import group

from celery_compensate import InvalidSaga, SagaState, saga, SagaResult

from .. import tasks
from ..helpers import assert_stage_order, ledger, undone, wait_for


def test_a_completed_child_passes_its_result_on(celery_app, celery_worker,
                                                rds):
    res = saga(tasks.do.si('a'), saga(tasks.do.si('b'), tasks.do.si('c')),
               tasks.chained.s('d')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPLETED
    (child,) = res.children
    assert child.id == f'{res.id}~1'
    assert child.state is SagaState.COMPLETED
    assert child.parent_saga == res
    assert child.info().parent == (res.id, 1)
    entries = ledger(rds, celery_app, res.id)
    assert undone(entries) == []
    # the child's result (its last step's) is the next step's argument
    assert "do:d:'res-c'" in entries
    assert res.get(timeout=5) == 'res-d'


def test_a_child_gets_the_previous_result_like_a_chain(celery_app,
                                                       celery_worker, rds):
    res = saga(tasks.do.si('a'), saga(tasks.chained.s('b'),
                                      tasks.do.si('c'))).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPLETED
    assert "do:b:'res-a'" in ledger(rds, celery_app, res.id)


def test_a_failing_child_compensates_itself_first(celery_app, celery_worker,
                                                  rds):
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), tasks.do.si('c', fail=True)),
               tasks.do.si('d')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    (child,) = res.children
    assert child.state is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert undone(entries) == ['b', 'a']
    assert_stage_order(entries, {'b'}, {'a'})
    assert 'start:d' not in entries
    record = res.info()
    assert record.failed_step == 1
    assert f'nested saga {child.id} is COMPENSATED' in record.reason
    assert 'c failed on purpose' in record.reason


def test_a_completed_child_is_undone_as_a_unit(celery_app, celery_worker,
                                               rds):
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), tasks.do.si('c')),
               tasks.do.si('d', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    (child,) = res.children
    info = child.info()
    # the child's own compensation, in reverse, and recorded on it
    assert info.state is SagaState.COMPENSATED
    assert info.compensation_started is not None
    assert 'undone as a unit' in info.reason
    entries = ledger(rds, celery_app, res.id)
    assert undone(entries) == ['c', 'b', 'a']
    assert_stage_order(entries, {'c'}, {'b'})
    # only then do the parent's earlier steps' undos start
    assert_stage_order(entries, {'c', 'b'}, {'a'})
    assert res.info().steps[1].undo_state.name == 'DONE'


def test_a_child_as_a_parallel_member(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'),
               group(saga(tasks.do.si('b1'), tasks.do.si('b2')),
                     tasks.do.si('p')),
               tasks.do.si('c', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert sorted(undone(entries)) == ['a', 'b1', 'b2', 'p']
    assert_stage_order(entries, {'b2'}, {'b1'})
    assert_stage_order(entries, {'b1', 'b2', 'p'}, {'a'})
    assert res.children[0].id == f'{res.id}~1'


def test_a_saga_piped_into_a_saga_is_nested(celery_app, celery_worker, rds):
    payment = saga(tasks.do.si('charge'), tasks.do.si('capture'))
    order = saga(tasks.do.si('reserve')) | payment | tasks.do.si('ship',
                                                                 fail=True)
    assert len(order.stages) == 3
    res = order.apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert [c.state for c in res.children] == [SagaState.COMPENSATED]
    assert undone(ledger(rds, celery_app, res.id)) == [
        'capture', 'charge', 'reserve']


def test_nesting_deeper_than_the_limit_is_refused(celery_app):
    inner = saga(tasks.do.si('x'))
    for _ in range(7):
        inner = saga(tasks.do.si('y'), inner)
    assert len(inner.stages) == 2       # 8 levels: allowed
    with pytest.raises(InvalidSaga, match=r'9 levels deep, more than '
                                          r'compensate_max_depth \(8\)'):
        saga(tasks.do.si('z'), inner)


def test_a_nested_saga_may_not_contain_a_pivot(celery_app):
    with pytest.raises(InvalidSaga, match=r'step 1 \(nested saga\): a nested '
                                          'saga cannot contain a pivot'):
        saga(tasks.do.si('a'), saga(tasks.forward.si('p').set(
            compensate_pivot=True)))


def test_abort_of_the_parent_aborts_the_running_child(celery_app,
                                                      celery_worker, rds):
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), tasks.do.si('c', sleep=2)),
               tasks.do.si('d')).apply_async()
    wait_for(lambda: 'start:c' in ledger(rds, celery_app, res.id))
    assert res.abort('test')
    assert res.children[0].state is SagaState.COMPENSATING
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    child = res.children[0]
    assert child.state is SagaState.COMPENSATED
    assert f'its parent {res.id} was aborted' in child.info().reason
    entries = ledger(rds, celery_app, res.id)
    # c (a threads pool cannot stop it) completes during the compensation
    # and is undone first, then b; the parent's a only after both
    assert undone(entries) == ['c', 'b', 'a']
    assert_stage_order(entries, {'c', 'b'}, {'a'})
    assert 'start:d' not in entries


def test_retry_of_the_parent_redrives_its_failed_child(celery_app,
                                                       celery_worker, rds):
    sid = 'nested-retry'
    child_id = f'{sid}~1'
    rds.set(tasks.countdown_key(celery_app, child_id, 'b'), 100)
    try:
        res = saga(tasks.do.si('a'), saga(tasks.do.si('b'), tasks.do.si('c')),
                   tasks.do.si('d', fail=True)).apply_async(saga_id=sid)
        assert res.wait(timeout=20) is SagaState.COMPENSATION_FAILED
        child = SagaResult(child_id, app=celery_app)
        assert child.state is SagaState.COMPENSATION_FAILED
        # the parent's earlier steps wait: nothing after the child is undone
        entries = ledger(rds, celery_app, sid)
        assert undone(entries) == ['c']
        rds.delete(tasks.countdown_key(celery_app, child_id, 'b'))
        assert res.retry()
        assert res.wait(timeout=20) is SagaState.COMPENSATED
        assert child.state is SagaState.COMPENSATED
        assert undone(ledger(rds, celery_app, sid)) == ['c', 'b', 'a']
    finally:
        rds.delete(tasks.countdown_key(celery_app, child_id, 'b'))


def test_a_child_failing_to_compensate_itself_fails_its_parent(
        celery_app, celery_worker, rds):
    sid = 'nested-cf'
    child_id = f'{sid}~1'
    rds.set(tasks.countdown_key(celery_app, child_id, 'b'), 100)
    try:
        res = saga(tasks.do.si('a'),
                   saga(tasks.do.si('b'), tasks.do.si('c', fail=True)),
                   ).apply_async(saga_id=sid)
        assert res.wait(timeout=20) is SagaState.COMPENSATION_FAILED
        assert res.info().steps[0].undo_state.name == 'NONE'
        rds.delete(tasks.countdown_key(celery_app, child_id, 'b'))
        assert res.retry()
        assert res.wait(timeout=20) is SagaState.COMPENSATED
        assert undone(ledger(rds, celery_app, sid)) == ['b', 'a']
    finally:
        rds.delete(tasks.countdown_key(celery_app, child_id, 'b'))


def test_children_expire_with_their_outermost_saga(celery_app, celery_worker,
                                                   rds):
    res = saga(saga(tasks.do.si('a')), tasks.do.si('b')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPLETED
    store = res._store
    child = store.keys.saga(f'{res.id}~0')
    assert rds.ttl(child) > 0
    assert rds.ttl(store.keys.saga(res.id)) > 0


def test_a_nested_saga_travels_as_a_dict_and_as_a_link(celery_app,
                                                       celery_worker, rds):
    """Rebuilt by ``Signature.from_dict`` (a link, a chord body), the plan
    is the same, children included; as a link it runs and compensates."""
    import json

    from celery.canvas import Signature
    sg = saga(tasks.chained.s('a'), saga(tasks.do.si('b'), tasks.do.si('c')),
              tasks.do.si('d', fail=True))
    rebuilt = Signature.from_dict(json.loads(json.dumps(dict(sg))),
                                  app=celery_app)
    assert rebuilt._plan.to_list() == sg._plan.to_list()
    assert sg.clone()._plan.to_list() == sg._plan.to_list()
    handle = sg.freeze()
    tasks.plain.apply_async(('x',), link=sg)
    assert handle.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, handle.id)
    assert "do:a:'res-x'" in entries
    # (t.undo names the step by its first argument: 'res-x' for a)
    assert undone(entries) == ['c', 'b', 'res-x']


def test_three_levels_undone_innermost_first(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'),
               saga(tasks.do.si('b'), saga(tasks.do.si('c'), tasks.do.si('d'))),
               tasks.do.si('e', fail=True)).apply_async()
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['d', 'c', 'b', 'a']
    (child,) = res.children
    assert [g.state for g in child.children] == [SagaState.COMPENSATED]
