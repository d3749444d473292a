"""Plans and steps the nested-saga store tests share: a parent ``p`` (a ->
child -> d) whose child ``p~1`` is b -> c, and the store calls that move
them, without publishing anything (no worker: each test drives the store
itself, as Nesting would)."""
from __future__ import annotations

import json
import time
from typing import Any

from celery_compensate import SagaState
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef, UndoSpec
from celery_compensate.store import Outcome, Reply, SagaStore
from celery_compensate.store import layout as L

UNDO = UndoSpec('t.undo')
#: a nested saga's step
SAGA = TaskRef('celery_compensate.saga')


def child_plan() -> Plan:
    """b -> c"""
    return Plan.from_stages([[(TaskRef('t.b'), UNDO, False)],
                             [(TaskRef('t.c'), UNDO, False)]])


def parent_plan(child: Plan | None = None) -> Plan:
    """a -> child (default: b -> c) -> d"""
    return Plan.from_stages([
        [(TaskRef('t.a'), UNDO, False)],
        [(SAGA, None, False, None, None, 0.0, False, child or child_plan())],
        [(TaskRef('t.d'), UNDO, False)],
    ])


def make(celery_app: Any, sid: str = 'p',
         plan: Plan | None = None) -> SagaStore:
    """Store the parent (``parent_plan()`` by default)."""
    store = get_state(celery_app).store
    assert store.create(sid, plan or parent_plan())
    return store


def parallel(celery_app: Any, sid: str = 'q') -> SagaStore:
    """a -> [child (b -> c), y], its child ``<sid>~1`` started."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([
        [(TaskRef('t.a'), UNDO, False)],
        [(SAGA, None, False, None, None, 0.0, False, child_plan()),
         (TaskRef('t.y'), UNDO, False)],
    ])
    assert store.create(sid, plan)
    store.step_done(sid, 0, '"ra"')
    assert store.start(f'{sid}~1', child_plan(),
                       parent=(sid, 1)) is Reply.CREATED
    return store


def started(store: SagaStore, sid: str = 'p') -> str:
    """a completes; the child ``<sid>~1`` is started."""
    assert store.step_done(sid, 0, '"ra"').status is Reply.NEXT
    assert store.start(f'{sid}~1', child_plan(),
                       parent=(sid, 1)) is Reply.CREATED
    return f'{sid}~1'


def complete_child(store: SagaStore, child: str = 'p~1') -> Outcome:
    """b and c complete: the child is COMPLETED (its report owed)."""
    store.step_done(child, 0, '"rb"')
    done = store.step_done(child, 1, '"rc"')
    assert done.new_state is SagaState.COMPLETED
    return done


def deliver(store: SagaStore, child: str) -> Any:
    """What ``Nesting.report`` sends, as store commands only: the parent's
    command with the report's token, then ``reported``.  Returns the
    parent's outcome (``None``: nothing owed; ``'cleared'``: the child is
    at work again)."""
    parent, _, index_text = child.rpartition('~')
    index = int(index_text)
    rep = store.report(child)
    if rep is None or rep.token is None:
        return None
    assert rep.mine
    if rep.state not in (SagaState.COMPLETED, SagaState.COMPENSATED,
                         SagaState.COMPENSATION_FAILED):
        store.reported(child, rep.token)
        return 'cleared'
    if rep.state is SagaState.COMPLETED:
        result = rep.results[0] if len(rep.results) == 1 else rep.results
        out = store.step_done(parent, index, json.dumps(result), rep.token)
    elif rep.undo_for is None:
        out = store.step_failed(parent, index, 'child failed',
                                token=rep.token)
    elif rep.state is SagaState.COMPENSATED:
        out = store.undo_done(parent, index, rep.token)
    else:
        out = store.undo_failed(parent, index, rep.undo_for, 'child CF',
                                final=True, token=rep.token, nested=True)
    store.reported(child, rep.token)
    return out


def child_compensated_then_reported(store: SagaStore) -> str:
    """The child's c is given up as lost, b undone: the child COMPENSATED,
    reported, and undone for its parent (the parent's undo of step 1 D,
    its undo of a queued)."""
    child = started(store)
    store.step_done(child, 0, '"rb"')
    store.step_failed(child, 1, 'lost: its worker died')
    assert store.undo_done(child, 0).new_state is SagaState.COMPENSATED
    assert deliver(store, child).status is Reply.CLAIMED
    assert store.unwind('p', 1, 1, 'u1').status is Reply.REPORT
    assert deliver(store, child).status is Reply.UNDONE
    return child


def reversed_parent(celery_app: Any) -> tuple[SagaStore, str]:
    """As ``child_compensated_then_reported``; then c completes after all
    and its undo spends its budget (2 attempts): the child is
    COMPENSATION_FAILED and owes p that report."""
    store = make(celery_app)
    child = child_compensated_then_reported(store)
    assert store.step_done(child, 1, '"rc"').status is Reply.LATE
    store.undo_failed(child, 1, 1, 'no', countdown=0)
    cf = store.undo_failed(child, 1, 2, 'no again', countdown=0)
    assert cf.new_state is SagaState.COMPENSATION_FAILED
    return store, child


def stale_report(celery_app: Any, rds: Any) -> tuple[SagaStore, str, str]:
    """As ``reversed_parent``, with the child's report delivered (p's undo
    of step 1 turned back to F); also the token of the report that had
    recorded that undo done, for a stalled reporter to resend."""
    store, child = reversed_parent(celery_app)
    t1 = rds.hget(store.keys.saga('p'), L.undo_token(1))
    assert deliver(store, child).status is Reply.FAILED
    return store, child, t1


def lapse(rds: Any, store: SagaStore, saga_id: str, index: int) -> None:
    """Step ``index``'s lease (or its undo's) lapsed a second ago."""
    rds.hset(store.keys.saga(saga_id), L.deadline(index),
             f'{time.time() - 1:.3f}')


def due_score(store: SagaStore, rds: Any, saga_id: str) -> Any:
    """The saga's score in ``:due`` (``None``: not there)."""
    return rds.zscore(store.keys.for_saga(saga_id)[1], saga_id)
