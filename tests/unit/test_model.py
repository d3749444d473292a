"""The pure saga model (no Redis, no Celery)."""
from __future__ import annotations

import pytest

from celery_compensate.model import (
    Plan, SagaState, StepSpec, TaskRef, UndoSpec, parse_task_id,
    step_task_id, undo_task_id, validate_saga_id,
)


def test_task_ids_round_trip():
    sid = '0b7eab0d-7365-4d29-8dc7-18485590a0bc'
    step = parse_task_id(step_task_id(sid, 12))
    assert (step.saga_id, step.index, step.is_undo) == (sid, 12, False)
    undo = parse_task_id(undo_task_id(sid, 3, 2))
    assert (undo.saga_id, undo.index, undo.is_undo, undo.attempt) == (sid, 3, True, 2)
    for other in (None, '', sid, 'a.b.c', f'{sid}.x1', f'{sid}.u1'):
        assert parse_task_id(other) is None


def test_undo_call_args():
    mutable = UndoSpec('u', args=(9,), kwargs={'z': 1})
    assert mutable.call_args('r', [1, 2], {'k': 3}) == (('r', 1, 2, 9), {'k': 3, 'z': 1})
    immutable = UndoSpec('u', args=(9,), immutable=True)
    assert immutable.call_args('r', [1, 2], {'k': 3}) == ((9,), {})


def test_plan_numbers_steps_across_stages_and_round_trips():
    plan = Plan.from_stages([[(TaskRef('a'), UndoSpec('u'), False)],
                             [(TaskRef('b'), None, False),
                              (TaskRef('c'), UndoSpec('u'), True)]])
    assert [(s.index, s.stage, s.undo_flag) for s in plan.steps] == [
        (0, 0, '1'), (1, 1, '0'), (2, 1, '2')]
    for step in plan.steps:
        assert StepSpec.from_dict(step.to_dict()) == step
    with pytest.raises(ValueError):
        Plan(())


def test_states_and_ids():
    assert SagaState.COMPENSATION_FAILED.is_final
    assert not SagaState.COMPENSATING.is_final
    with pytest.raises(ValueError, match='invalid saga id'):
        validate_saga_id('a.b')
