"""A saga is a canvas object: a ``Signature`` that survives serialization,
links, chains, clones and freezes like ``chain`` and ``group`` do; against
a real Redis and a real worker."""
from __future__ import annotations

import json

import pytest
from celery import chain
from celery.canvas import Signature

from celery_compensate import (
    InvalidSaga, Saga, SagaCompensated, SagaResult, SagaState, saga,
)

from .. import tasks
from ..helpers import ledger, undone


def _done(rds, app, res):
    return [e for e in ledger(rds, app, res.id) if e.startswith('do:')]


def test_a_saga_is_a_signature_that_survives_json(celery_app, celery_worker,
                                                  rds):
    sg = saga(tasks.do.si('a'), tasks.do.si('b'), queue=None)
    assert isinstance(sg, Signature) and sg.subtask_type == 'saga'
    again = Signature.from_dict(json.loads(json.dumps(sg)), app=celery_app)
    assert isinstance(again, Saga)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(sg))
    assert [list(s.args) for s in again.steps] == [['a'], ['b']]
    res = again.apply_async()
    assert res.get(timeout=15) == 'res-b'
    assert _done(rds, celery_app, res) == ['do:a', 'do:b']


def test_freeze_fixes_the_id(celery_app, celery_worker):
    sg = saga(tasks.do.si('a'))
    assert sg.id is None
    frozen = sg.freeze()
    assert isinstance(frozen, SagaResult) and sg.id == frozen.id
    assert sg.freeze().id == frozen.id              # frozen once
    assert sg.apply_async().id == frozen.id
    assert frozen.get(timeout=15) == 'res-a'
    with pytest.raises(InvalidSaga, match='bad id'):
        saga(tasks.do.si('a')).freeze('bad id!')


def test_clone_s_and_si_give_the_first_stage_its_arguments(
        celery_app, celery_worker, rds):
    sg = saga(tasks.do.s(), tasks.do.si('b'))
    with pytest.raises(InvalidSaga):
        sg.apply_async()             # t.do needs its name: none given yet
    res = sg.s('a').delay()
    assert res.get(timeout=15) == 'res-b'
    assert _done(rds, celery_app, res) == ['do:a', 'do:b']
    # si: a parent's result is not passed in
    fixed = sg.si('x')
    assert fixed.immutable
    res = fixed.apply_async(('ignored',))
    assert res.get(timeout=15) == 'res-b'
    assert _done(rds, celery_app, res) == ['do:x', 'do:b']
    assert json.dumps(sg.clone()) == json.dumps(sg) and sg.clone() is not sg


def test_pipes_append_and_prepend_steps(celery_app, celery_worker, rds):
    middle = saga(tasks.do.si('b'))
    combined = tasks.do.si('a') | middle | tasks.do.si('c')
    assert isinstance(combined, Saga)
    assert [s.args for s in combined.steps] == [('a',), ('b',), ('c',)]
    # a saga piped into a saga stays a unit: one step, a nested saga
    combined = combined | saga(tasks.do.si('d'))
    assert len(combined.steps) == 4 and isinstance(combined.steps[3], Saga)
    res = combined.apply_async()
    assert res.get(timeout=15) == 'res-d'
    assert _done(rds, celery_app, res) == ['do:a', 'do:b', 'do:c', 'do:d']
    assert res.children[0].id == f'{res.id}~3'


def test_countdown_delays_the_first_stage_only(celery_app):
    sg = saga(tasks.do.si('a'), tasks.do.si('b'), tasks.do.si('c'))
    plan, _ = sg.plan_for((), {}, {'countdown': 1, 'expires': 60,
                                   'priority': 3})
    options = [step.call.options for step in plan.steps]
    assert options[0] == {'countdown': 1, 'expires': 60, 'priority': 3}
    assert options[1] == options[2] == {'priority': 3}
    assert [step.delay for step in plan.steps] == [1.0, 0.0, 0.0]


def test_a_saga_as_a_link_starts_with_the_parents_result(
        celery_app, celery_worker, rds):
    sg = saga(tasks.do.s(), tasks.do.si('b'))
    handle = sg.freeze()
    tasks.plain.apply_async(('p',), link=sg)
    assert handle.get(timeout=15) == 'res-b'
    assert _done(rds, celery_app, handle) == ['do:res-p', 'do:b']


def test_a_saga_as_a_chains_last_link(celery_app, celery_worker, rds):
    sg = saga(tasks.do.s(), tasks.do.si('b', fail=True))
    handle = sg.freeze()
    chained = chain(tasks.plain.s('p'), sg).apply_async()
    assert chained == handle and chained.parent is not None
    with pytest.raises(SagaCompensated) as caught:
        handle.get(timeout=15)
    assert caught.value.failed_step == 1
    assert undone(ledger(rds, celery_app, handle.id)) == ['res-p']
    assert handle.state is SagaState.COMPENSATED


def test_nested_sagas_with_ids_and_sagas_inside_chains_are_refused_clearly(
        celery_app):
    inner = saga(tasks.do.si('b'))
    inner.freeze('mine')
    with pytest.raises(InvalidSaga, match=r'step 1 \(nested saga\): a nested '
                                          'saga gets its id from its parent'):
        saga(tasks.do.si('a'), inner)
    inner = saga(tasks.do.si('b'))
    with pytest.raises(InvalidSaga, match='last link of a chain'):
        inner.apply_async(chain=[tasks.do.si('x')])
