"""Nested sagas and calls that arrive late, from a fourth adversarial
review (each failing test failed before its fix): an old "undone" report
resent after an operator's retry, a leftover child whose own child is at
work, and a child its retried parent waits for again."""
from __future__ import annotations

import pytest

from celery_compensate import SagaState
from celery_compensate.appstate import get_state
from celery_compensate.store import Reply
from celery_compensate.store import layout as L

from .nested import (
    child_compensated_then_reported, child_plan, deliver, make,
    parent_plan, reversed_parent, stale_report, started,
)

from .test_nested_leftovers import _c_plan, _g_plan


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_stale_undone_report_after_retry_while_child_redriven(celery_app,
                                                             rds):
    """The stalled T1 resend arrives after the operator's retry, while
    the re-driven child still compensates (p's x1 = R held '~'): stale."""
    store, child, t1 = stale_report(celery_app, rds)
    store.retry('p')
    assert store.unwind('p', 1, 2).status is Reply.REDRIVEN
    assert store.get_state(child) is SagaState.COMPENSATING
    slow = store.undo_done('p', 1, t1)      # the stalled first reporter
    p = store.keys.saga('p')
    assert slow.status is Reply.DUPLICATE, (
        slow.status, slow.new_state, rds.hget(p, L.undo_state(1)),
        store.get_state(child))


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_stale_undone_report_after_retry_before_unwind(celery_app, rds):
    """Same, arriving between the retry (x1 = Q) and the unwind: stale."""
    store, child, t1 = stale_report(celery_app, rds)
    store.retry('p')
    assert rds.hget(store.keys.saga('p'), L.undo_state(1)) == 'Q'
    slow = store.undo_done('p', 1, t1)
    assert slow.status is Reply.DUPLICATE, (slow.status, slow.new_state,
                                            store.get_state(child))


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_leftover_whose_own_child_is_at_work_is_not_replaced(celery_app,
                                                           rds):
    """The leftover p~1 is COMPENSATED, but its own child G = p~1~0 is at
    work (a late completer's undo running on an old worker): start looks
    down the leftover's tree and answers BUSY, so the old worker's outcome
    never lands on a new G."""
    store = get_state(celery_app).store
    assert store.create('p', parent_plan(_c_plan()))
    store.step_done('p', 0, '"ra"')
    assert store.start('p~1', _c_plan(), parent=('p', 1)) is Reply.CREATED
    assert store.start('p~1~0', _g_plan(),
                       parent=('p~1', 0)) is Reply.CREATED
    # G's e is lost: G COMPENSATED (nothing to undo), reported; p~1 undoes
    # G (REPORT), COMPENSATED; p likewise
    store.step_failed('p~1~0', 0, 'lost')
    assert store.get_state('p~1~0') is SagaState.COMPENSATED
    for kid, up, i in (('p~1~0', 'p~1', 0), ('p~1', 'p', 1)):
        rep = store.report(kid)
        store.step_failed(up, i, 'child compensated', token=rep.token)
        store.reported(kid, rep.token)
        assert store.unwind(up, i, 1, f'u-{kid}').status is Reply.REPORT
        rep = store.report(kid)
        assert store.undo_done(up, i, rep.token).status is Reply.UNDONE
        store.reported(kid, rep.token)
        if up == 'p~1':
            assert store.get_state('p~1') is SagaState.COMPENSATED
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    # e completes after all: G at work again, its undo on an old worker
    late = store.step_done('p~1~0', 0, '"re"')
    assert late.status is Reply.LATE
    assert [(d.step.index, d.attempt) for d in late.undos] == [(0, 1)]
    assert store.undo_begin('p~1~0', 0, 1, 'old-worker') is Reply.RUN
    rds.delete(store.keys.saga('p'))            # p's ttl ran out
    # the id is reused; its p~1 starts while the old G is still at work
    assert store.create('p', parent_plan(_c_plan()))
    store.step_done('p', 0, '"ra2"')
    started_again = store.start('p~1', _c_plan(), parent=('p', 1))
    gkey = store.keys.saga('p~1~0')
    old_g_alive = rds.hget(gkey, L.STATE)
    # a leftover tree still at work is not replaced
    assert started_again is Reply.BUSY
    assert old_g_alive == 'COMPENSATING'
    # the old worker's outcome lands on the old G it belongs to
    old = store.undo_done('p~1~0', 0, 'old-worker-done')
    assert old.status is Reply.UNDONE
    assert old.new_state is SagaState.COMPENSATED


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_unwind_report_keeps_the_ttl_of_a_child_its_parent_waits_for(
        celery_app, rds):
    """A COMPENSATED child that kept the TTL its root's end gave it
    (retried alone): when a retried parent waits for it again, unwind drops
    ``xp`` and its expiry, so it cannot vanish before its report."""
    import time
    store, child = reversed_parent(celery_app)
    ck = store.keys.saga(child)
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    rds.hset(ck, L.REPORT_BY, f'{time.time() - 1:.3f}')
    assert store.recover(child).status is Reply.REPORT
    assert deliver(store, child).status is Reply.FAILED
    assert store.retry(child).status is Reply.RETRIED
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    assert rds.ttl(ck) > 0                      # xp: it expires
    store.retry('p')
    assert store.unwind('p', 1, 2).status is Reply.REPORT
    p = store.keys.saga('p')
    assert rds.hget(p, L.held(1)) == L.CHILD_HOLDS
    assert rds.hget(ck, L.REPORT)               # owed to a waiting parent
    assert rds.ttl(ck) == -1, rds.ttl(ck)


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_the_root_does_not_end_on_a_stale_report_after_a_retry(
        celery_app, rds):
    """The Q variant's consequence, had the resend been taken: the root
    must not end while the child stays COMPENSATION_FAILED."""
    store, child, t1 = stale_report(celery_app, rds)
    store.retry('p')
    store.undo_done('p', 1, t1)
    un = store.unwind('p', 1, 2)
    end = store.undo_done('p', 0)
    assert not (end.new_state is SagaState.COMPENSATED
                and store.get_state(child)
                is SagaState.COMPENSATION_FAILED), (un.status,)


# -- checks that held --------------------------------------------------------

@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_a_fresh_report_settles_an_F_undo(celery_app, rds):
    store, child, t1 = stale_report(celery_app, rds)
    ot = rds.hget(store.keys.saga('p'), 'ot1')
    assert ot == f' {t1} '
    # a token sharing a prefix with T1 is not taken for it
    assert store.undo_done('p', 1, t1[:-1]).status is Reply.UNDONE
    rds.hset(store.keys.saga('p'), L.undo_state(1), 'F')


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_child_retried_alone_reports_to_F_undo(celery_app, rds):
    store, child, t1 = stale_report(celery_app, rds)
    assert store.retry(child).status is Reply.RETRIED
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    out = deliver(store, child)
    assert out.status is Reply.UNDONE
    assert out.new_state is SagaState.COMPENSATING     # resumed
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED


def test_resend_of_own_start_is_exists_not_busy(celery_app, rds):
    store = make(celery_app)
    child = started(store)
    assert store.start(child, child_plan(), parent=('p', 1)) is Reply.EXISTS
    store.step_done(child, 0, '"rb"')
    store.step_failed(child, 1, 'x')            # child COMPENSATING
    assert store.get_state(child) is SagaState.COMPENSATING
    assert store.start(child, child_plan(), parent=('p', 1)) is Reply.EXISTS


def test_unwind_of_a_leftover_keeps_xp(celery_app, rds):
    store = make(celery_app)
    child = child_compensated_then_reported(store)
    store.step_done(child, 1, '"rc"')           # at work again
    assert store.undo_done('p', 0).new_state is SagaState.COMPENSATED
    ck = store.keys.saga(child)
    assert rds.hget(ck, 'xp') == '1'
    rds.delete(store.keys.saga('p'))
    make(celery_app)
    store.step_done('p', 0, '"ra2"')
    store.step_failed('p', 1, 'given up')
    assert store.unwind('p', 1, 1).status is Reply.GONE
    assert rds.hget(ck, 'xp') == '1'
    assert store.undo_done(child, 1).new_state is SagaState.COMPENSATED
    assert rds.hget(ck, L.REPORT) is None and rds.ttl(ck) > 0
