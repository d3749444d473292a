"""The saga invariants, each with a test that fails without it."""
from __future__ import annotations

import logging
import threading

import pytest
from celery import group
from celery import signals as celery_signals

from celery_compensate import SagaResult, SagaState, UndoState, saga, signals
from celery_compensate.appstate import get_state
from celery_compensate.messages import UNSTORED_RESULT
from celery_compensate.model import Plan, TaskRef, UndoSpec, undo_task_id
from celery_compensate.store import SagaStore, shard_of
from celery_compensate.store import layout as L

from .. import tasks
from ..helpers import ledger, wait_for
from ..helpers import undone


def test_step_is_recorded_before_the_next_link_is_published(
        celery_app, celery_worker, rds):
    """Invariant 1: step a's on_success is still sleeping when step b runs
    and fails; a must already be recorded (and so undone)."""
    res = saga(tasks.slow_success.si('a'),
               tasks.check_prev.si('b', 0)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert 'prev-recorded:D' in entries
    assert undone(entries) == ['a']


def _plan(stages):
    return Plan.from_stages([[(TaskRef(n), UndoSpec('t.undo'), False)
                              for n in stage] for stage in stages])


def test_compensation_is_claimed_exactly_once_under_concurrency(
        celery_app, rds):
    """Invariant 2: 32 concurrent failure notifications for the members of
    a parallel stage: one claim, each undo made due exactly once."""
    store = get_state(celery_app).store
    plan = _plan([['a'], [f'b{i}' for i in range(8)]])
    sid = 'claim-test'
    assert store.create(sid, plan)
    assert store.step_done(sid, 0, '"ra"').status == 'next'
    for i in (1, 2):      # two members completed before anything failed
        assert store.step_done(sid, i, f'"r{i}"').status == 'recorded'
    rds.script_flush()    # as after a Redis restart: scripts must reload
    outcomes, barrier = [], threading.Barrier(32)

    def notify(n):
        barrier.wait()
        outcomes.append(store.step_failed(sid, 3 + n % 6, 'boom'))

    threads = [threading.Thread(target=notify, args=(n,)) for n in range(32)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [o.status for o in outcomes].count('claimed') == 1
    assert sorted(d.step.index for o in outcomes for d in o.undos) == [1, 2]
    assert store.get_state(sid) is SagaState.COMPENSATING
    # the stage before opens only when both undos are done
    assert store.undo_done(sid, 1).undos == []
    assert [d.step.index for d in store.undo_done(sid, 2).undos] == [0]
    assert store.undo_done(sid, 0).new_state is SagaState.COMPENSATED
    rds.delete(store.keys.saga(sid))


def test_late_completer_is_undone_before_the_stage_before(
        celery_app, celery_worker, rds):
    """Invariant 4: 'slow' finishes after compensation started."""
    res = saga(tasks.do.si('a'),
               group(tasks.do.si('fast', fail=True),
                     tasks.do.si('slow', sleep=0.8))).apply_async()
    wait_for(lambda: res.state is SagaState.COMPENSATING)
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, res.id)
    assert entries.index('fail:fast') < entries.index('do:slow')
    assert undone(entries) == ['slow', 'a']


def test_members_queued_when_compensation_begins_run_and_are_undone(
        celery_app, celery_worker, rds):
    """7 members on 4 worker threads: some start after the failure claimed
    compensation; each completed member is undone exactly once, 'a' last."""
    members = [tasks.do.si(f'm{i}', sleep=0.3) for i in range(6)]
    res = saga(tasks.do.si('a'),
               group(tasks.do.si('bad', fail=True), *members)).apply_async()
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    got = undone(ledger(rds, celery_app, res.id))
    assert sorted(got[:-1]) == [f'm{i}' for i in range(6)] and got[-1] == 'a'


def test_duplicate_messages_do_nothing(celery_app, celery_worker, rds):
    """Invariant 6, and redelivered forward steps: a duplicated undo message
    whose undo is done does not run; a redelivered step does not dispatch
    its next stage twice.  Undos carry a stable idempotency key."""
    res = saga(tasks.do.si('a'), tasks.do.si('b'),
               tasks.do.si('c', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    seen = []
    celery_signals.task_postrun.connect(
        lambda task_id=None, **_: seen.append(task_id), weak=False,
        dispatch_uid='dup-test')
    try:
        undo_id = undo_task_id(res.id, 0, 1)
        tasks.undo.apply_async(('res-a', 'a'), task_id=undo_id,
                               headers={'compensate_saga_id': res.id})
        tasks.do.apply_async(('a',), task_id=f'{res.id}.s0',
                             headers={'compensate_saga_id': res.id})
        wait_for(lambda: undo_id in seen and f'{res.id}.s0' in seen)
    finally:
        celery_signals.task_postrun.disconnect(dispatch_uid='dup-test')
    entries = ledger(rds, celery_app, res.id)
    assert undone(entries) == ['b', 'a']
    assert entries.count('start:b') == 1
    idem = rds.hgetall(f'{celery_app.conf.compensate_key_prefix}-t:idem:{res.id}')
    assert idem == {'a': f'{res.id}:0', 'b': f'{res.id}:1'}


@pytest.mark.compensate_conf(compensate_undo_max_attempts=5)
def test_undo_that_fails_then_recovers_is_retried(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True))
    # the undo of 'a' fails twice, then succeeds
    sid = 'retry-' + celery_app.conf.compensate_key_prefix
    rds.set(tasks.countdown_key(celery_app, sid, 'a'), 2)
    delays = []
    signals.undo_retry.connect(lambda **kw: delays.append(kw['countdown']),
                               weak=False, dispatch_uid='retry-delays')
    try:
        res = res.apply_async(saga_id=sid)
        assert res.wait(timeout=15) is SagaState.COMPENSATED
    finally:
        signals.undo_retry.disconnect(dispatch_uid='retry-delays')
    entries = ledger(rds, celery_app, sid)
    assert entries.count('undo-fail:a') == 2 and undone(entries) == ['a']
    assert res.steps[0].undo_attempts == 3
    assert delays == [0.05, 0.1]   # exponential backoff (tests use 0.05 s)


@pytest.mark.compensate_conf(compensate_undo_max_attempts=3)
def test_undo_budget_spent_is_compensation_failed(
        celery_app, celery_worker, rds, caplog):
    fired = []
    signals.compensation_failed.connect(
        lambda **kw: fired.append(kw), weak=False, dispatch_uid='cf-test')
    sid = 'fail-' + celery_app.conf.compensate_key_prefix
    rds.set(tasks.countdown_key(celery_app, sid, 'b'), 100)
    try:
        res = saga(tasks.do.si('a'), tasks.do.si('b'),
                   tasks.do.si('c', fail=True)).apply_async(saga_id=sid)
        with caplog.at_level(logging.ERROR, logger='celery_compensate'):
            assert res.wait(timeout=15) is SagaState.COMPENSATION_FAILED
            wait_for(lambda: fired)
    finally:
        signals.compensation_failed.disconnect(dispatch_uid='cf-test')
    entries = ledger(rds, celery_app, sid)
    assert entries.count('undo-fail:b') == 3       # the budget, not forever
    assert 'undo-start:a' not in entries           # remaining undos wait
    assert fired[0]['saga_id'] == sid and fired[0]['step'] == 1
    assert any(sid in r.getMessage() and 'COMPENSATION_FAILED' in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    info = res.info()
    assert info.steps[1].undo_state is UndoState.FAILED and 'on purpose' in info.steps[1].undo_error
    assert rds.ttl(get_state(celery_app).store.keys.saga(sid)) == -1  # never expires


def test_forward_retries_are_not_failures(celery_app, celery_worker, rds):
    started = []
    signals.compensation_started.connect(
        lambda **kw: started.append(kw['saga_id']), weak=False,
        dispatch_uid='retry-test')
    try:
        ok = saga(tasks.flaky.si('f', 2), tasks.do.si('b')).apply_async()
        assert ok.wait(timeout=15) is SagaState.COMPLETED
        bad = saga(tasks.do.si('a'), tasks.flaky.si('f', 9)).apply_async()
        assert bad.wait(timeout=15) is SagaState.COMPENSATED
    finally:
        signals.compensation_started.disconnect(dispatch_uid='retry-test')
    assert started == [bad.id]  # once, after the last retry
    assert ledger(rds, celery_app, bad.id).count('try:f:2') == 1
    assert undone(ledger(rds, celery_app, bad.id)) == ['a']


def test_reject_without_requeue_compensates(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'), tasks.do.si('b', reject=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['a']


def test_revoke_of_a_queued_step_compensates(celery_app, celery_worker, rds):
    """Step ids are known in advance, so the next step can be revoked while
    the first still runs; Celery then only sends task_revoked."""
    sid = 'revoke-' + celery_app.conf.compensate_key_prefix
    s = saga(tasks.do.si('a', sleep=0.5), tasks.do.si('b'), tasks.do.si('c'))
    res = s.apply_async(saga_id=sid)
    celery_app.control.revoke(f'{sid}.s1')
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = ledger(rds, celery_app, sid)
    assert 'start:b' not in entries and undone(entries) == ['a']
    assert 'revoked' in res.info().reason


def test_unknown_task_in_the_worker_compensates(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'),
               celery_app.signature('t.not_registered_anywhere')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['a']


def test_a_step_whose_result_cannot_be_stored_is_undone(
        celery_app, celery_worker, rds):
    """Its body returned (its effect happened) but the result is not JSON:
    the saga compensates, naming the encoding problem, and the step's own
    undo runs first, with the documented placeholder as its result."""
    res = saga(tasks.do.si('a'), tasks.unserializable.si('u'),
               tasks.do.si('c')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert 'cannot be stored as JSON' in res.info().reason
    log = ledger(rds, celery_app, res.id)
    assert undone(log) == ['u', 'a'] and 'start:c' not in log
    undo_u = next(e for e in log if e.startswith('undo:u:'))
    assert f"{{'{UNSTORED_RESULT}': 'ResultNotSerializable: " in undo_u


@pytest.mark.compensate_conf(compensate_result_max_bytes=1024)
def test_a_result_over_the_size_limit_is_not_stored(
        celery_app, celery_worker, rds):
    """compensate_result_max_bytes bounds stored results the same way: the
    step is undone with the placeholder, the reason names the limit, and
    the record never holds the result."""
    big = 'x' * 2000
    res = saga(tasks.do.si('a'), tasks.do.si(big), tasks.do.si('c')
               ).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    reason = res.info().reason
    assert 'ResultTooLarge' in reason and (
        'more than compensate_result_max_bytes (1024)') in reason
    log = ledger(rds, celery_app, res.id)
    assert undone(log) == [big, 'a']
    record = rds.hgetall(get_state(celery_app).store.keys.saga(res.id))
    assert all(len(v) < 1500 for k, v in record.items()
               if not k.startswith('p')), 'a field holds the big result'


@pytest.mark.compensate_conf(compensate_result_expires=1,
                              compensate_recovery_interval=0.2,
                              compensate_heartbeat_interval=0.1)
def test_finished_sagas_expire_to_baseline(celery_app, celery_worker, rds):
    """Invariant 9: one hash per saga; finished sagas leave the deadline
    and unfinished-saga indexes and expire, and the sweep then drops them
    from the listing index, so the key count returns to baseline."""
    prefix = celery_app.conf.compensate_key_prefix
    store = get_state(celery_app).store
    ok = saga(tasks.do.si('a'), group(tasks.do.si('b'), tasks.do.si('c')))
    bad = saga(tasks.do.si('a'), tasks.do.si('b', fail=True))
    results = [ok.apply_async(), bad.apply_async()]
    assert [r.wait(timeout=15) for r in results] == [
        SagaState.COMPLETED, SagaState.COMPENSATED]
    shards = {shard_of(r.id) for r in results}
    saga_keys = {store.keys.saga(r.id) for r in results}
    listing = ({store.keys.sagas(s) for s in shards}
               | {store.keys.ends(s) for s in shards})

    def keys() -> set[str]:
        # the sweeper's per-shard records are the baseline: they expire too
        return {k for k in rds.scan_iter(f'{prefix}:*')
                if not k.endswith(':sweep') and not k.endswith(':sweeper')}

    assert keys() <= saga_keys | listing
    assert saga_keys <= keys()
    assert not any(rds.exists(store.keys.live(s), store.keys.due(s))
                   for s in shards)
    wait_for(lambda: not keys(), timeout=10)


def test_every_script_touches_one_slot():
    """A saga's hash and its shard's deadline index share a hash tag."""
    from redis.crc import key_slot

    from celery_compensate.settings import Settings
    from celery_compensate.store import SHARDS
    from celery_compensate.store.scripts import COMMANDS, assemble
    store = SagaStore(Settings.from_conf({
        'compensate_redis_url': 'redis://localhost:1/0'}))
    for name in COMMANDS:
        script = assemble(name).text
        # every key a script names comes from KEYS (checked below); KEYS[6]
        # is a nested saga's parent (start, unwind), in its child's slot
        assert 'KEYS[7]' not in script and 'KEYS[1]' in script, name
        assert ('KEYS[6]' in script) == (name in ('start', 'unwind')), name
        # the one key built inside a script: a nested saga's, its parent's
        # key plus '~<step>' (finish expires a finished root's tree,
        # delete_tree deletes one, tree_at_work reads one), in the same hash
        # tag by construction (layout.shard_of)
        built = (2 * ('local function expire_kids' in script)
                 + 2 * ('local function delete_tree' in script)
                 + ('local function tree_at_work' in script))
        assert script.count(".. '~' ..") == built, name
    shards = set()
    for n in range(500):
        sid = f'saga-{n}'
        shards.add(shard_of(sid))
        slots = {key_slot(k.encode()) for k in (
            *store.keys.for_saga(sid), store.keys.saga(f'{sid}~2'),
            store.keys.saga(f'{sid}~2~0'), f"{store.keys.saga(sid)}~7")}
        slots.add(key_slot(store.keys.sweep(shard_of(sid)).encode()))
        slots.add(key_slot(store.keys.bad(shard_of(sid)).encode()))
        assert len(slots) == 1, sid
    assert len(shards) == SHARDS  # the sagas spread over every shard


def test_one_round_trip_per_successful_step(celery_app, celery_worker, rds):
    """Invariant 10: a saga costs 1 store round trip to start and 1 per
    successful step, however many steps it has."""
    store = get_state(celery_app).store
    calls = []
    original = store.client.execute_command

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    saga(tasks.do.si('warm')).apply_async().wait(timeout=10)  # loads scripts
    store.client.execute_command = counting
    try:
        for n in (3, 10):
            calls.clear()
            res = saga(*[tasks.do.si(f's{i}') for i in range(n)]).apply_async()
            wait_for(lambda res=res: rds.hget(store.keys.saga(res.id), L.STATE)
                     == 'COMPLETED')
            assert calls == ['EVALSHA'] * (n + 1), calls
    finally:
        store.client.execute_command = original


def test_signals_fire_once_per_transition(celery_app, celery_worker, rds):
    got: dict[str, list] = {}
    names = ('saga_started', 'saga_completed', 'compensation_started',
             'step_compensated', 'saga_compensated')
    for name in names:
        getattr(signals, name).connect(
            lambda name=name, **kw: got.setdefault(name, []).append(
                (kw['saga_id'], kw.get('step'))),
            weak=False, dispatch_uid=f'sig-{name}')
    # a raising receiver is logged, never propagated into Celery
    signals.saga_completed.connect(lambda **kw: 1 / 0, weak=False,
                                   dispatch_uid='sig-raise')
    try:
        ok = saga(tasks.do.si('a')).apply_async()
        bad = saga(tasks.do.si('a'), tasks.do.si('b'),
                   tasks.do.si('c', fail=True)).apply_async()
        assert ok.wait(timeout=15) is SagaState.COMPLETED
        assert bad.wait(timeout=15) is SagaState.COMPENSATED
        wait_for(lambda: len(got.get('saga_compensated', [])) == 1)
    finally:
        for name in names:
            getattr(signals, name).disconnect(dispatch_uid=f'sig-{name}')
        signals.saga_completed.disconnect(dispatch_uid='sig-raise')
    assert sorted(got['saga_started']) == sorted([(ok.id, None), (bad.id, None)])
    assert got['saga_completed'] == [(ok.id, None)]
    assert got['compensation_started'] == [(bad.id, 2)]
    assert got['step_compensated'] == [(bad.id, 1), (bad.id, 0)]
    assert got['saga_compensated'] == [(bad.id, None)]


@pytest.mark.compensate_conf(compensate_undo_queue='UNDO_QUEUE')
def test_undos_go_to_the_configured_queue(celery_app, celery_worker, rds):
    """Nobody consumes the undo queue here, so the undo waits in it."""
    undo_queue = get_state(celery_app).settings.undo_queue
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    wait_for(lambda: rds.llen(undo_queue) == 1)
    assert res.state is SagaState.COMPENSATING
    assert undone(ledger(rds, celery_app, res.id)) == []
    rds.delete(undo_queue)


def _undone_with(undo, celery_app, rds):
    """Run saga (a, b failing) with ``undo`` as a's undo, wait for it to be
    compensated; return it and its ledger."""
    res = saga(tasks.do.si('a').set(compensate_with=undo),
               tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    return res, ledger(rds, celery_app, res.id)


def test_undo_retried_by_celery_itself_completes(celery_app, celery_worker, rds):
    """The undo task's own self.retry() sends the same attempt again under
    the same task id; that copy must be let in, not taken for a duplicate."""
    res, entries = _undone_with(tasks.retrying_undo.s(), celery_app, rds)
    assert entries.count('undo-start:a:0') == 1 and "undo:a:'res-a'" in entries
    assert res.steps[0].undo_attempts == 1


def test_an_undo_that_replaces_itself_runs_the_replacement(
        celery_app, celery_worker, rds):
    """``self.replace()`` in an undo: Celery sends the replacement under the
    attempt's task id and raises ``Ignore``; the attempt is released, not
    counted as failed, and the replacement runs as the same attempt."""
    res, entries = _undone_with(tasks.replacing_undo.s(), celery_app, rds)
    assert 'replacing:a' in entries and "undo:a:'res-a'" in entries
    assert res.steps[0].undo_attempts == 1
    assert res.steps[0].undo_error is None


@pytest.mark.compensate_conf(compensate_queue_timeout=1.0,
                              compensate_step_timeout=1.0,
                              compensate_heartbeat_interval=0.2,
                              compensate_recovery_interval=0.2)
def test_an_undo_that_raises_ignore_is_sent_again(
        celery_app, celery_worker, rds):
    """``Ignore`` in an undo means: this copy steps aside.  Not a failed
    attempt: the attempt is queued again and, with nothing else coming,
    the sweep sends it again after the queue timeout."""
    res, entries = _undone_with(tasks.ignoring_undo.s(), celery_app, rds)
    assert entries.count('ignored:a') == 1 and "undo:a:'res-a'" in entries
    assert res.steps[0].undo_attempts == 1


def test_a_stale_failure_of_a_stage_never_dispatched_changes_nothing(
        celery_app, celery_worker, rds):
    """A message with the task id of a later stage's step (stale, or
    forged) that fails on a worker must not compensate a healthy saga: the
    failure is refused like such a completion, and the saga completes."""
    res = saga(tasks.do.si('a', sleep=1.0), tasks.do.si('b'),
               tasks.do.si('c')).apply_async()
    wait_for(lambda: 'start:a' in ledger(rds, celery_app, res.id))
    stale = celery_app.send_task('t.do', args=('c-stale',),
                                 kwargs={'fail': True},
                                 task_id=f'{res.id}.s2')
    wait_for(lambda: stale.state == 'FAILURE', timeout=10)
    assert res.wait(timeout=15) is SagaState.COMPLETED
    assert undone(ledger(rds, celery_app, res.id)) == []


def test_an_undo_refused_at_publish_fails_the_compensation_loudly(
        celery_app, celery_worker, rds, monkeypatch):
    """Its signature changed since the saga started (a deploy): Celery's
    argument check refuses every attempt, so the budget is spent at once,
    the error is on the step and the saga is COMPENSATION_FAILED, not
    re-sent for ever; once the undo is fixed, retry finishes it."""
    undo = celery_app.tasks['t.undo']

    def changed(*args, **kwargs):
        raise TypeError('undo() missing 1 required positional argument: '
                        "'reason'")

    res = saga(tasks.do.si('a'),
               tasks.do.si('b', fail=True, sleep=0.5)).apply_async()
    monkeypatch.setattr(undo, '__header__', changed, raising=False)
    assert res.wait(timeout=10) is SagaState.COMPENSATION_FAILED
    step = res.steps[0]
    assert step.undo_state is UndoState.FAILED
    assert step.undo_attempts == get_state(celery_app).settings \
        .undo_max_attempts
    assert "cannot be sent: TypeError: undo() missing 1 required" in \
        step.undo_error
    monkeypatch.delattr(undo, '__header__')
    assert res.retry()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    assert undone(ledger(rds, celery_app, res.id)) == ['a']


def test_a_first_stage_that_cannot_be_published_is_compensated(
        celery_app, celery_worker, rds, monkeypatch, caplog):
    """The broker refuses the second member of stage 0 (after Celery's own
    publish retries): apply_async raises that error, and the saga, which
    exists, is announced RUNNING first, then compensated: the member that
    was sent runs and is undone."""
    from kombu.exceptions import OperationalError
    from celery_compensate.coordinator import Coordinator
    started = []
    signals.saga_started.connect(lambda **kw: started.append(kw['saga_id']),
                                 weak=False, dispatch_uid='first-stage')
    original = Coordinator.publish_step

    def publish(self, saga_id, step, *args, **kwargs):
        if step.index == 1:
            raise OperationalError('broker down (test)')
        return original(self, saga_id, step, *args, **kwargs)

    monkeypatch.setattr(Coordinator, 'publish_step', publish)
    sid = f'first-{celery_app.conf.compensate_key_prefix}'
    try:
        with caplog.at_level(logging.INFO, logger='celery_compensate'):
            with pytest.raises(OperationalError, match='broker down'):
                saga(group(tasks.do.si('a'), tasks.do.si('b')),
                     tasks.do.si('c')).apply_async(saga_id=sid)
            res = SagaResult(sid, app=celery_app)
            assert res.wait(timeout=10) is SagaState.COMPENSATED
    finally:
        signals.saga_started.disconnect(dispatch_uid='first-stage')
    assert started == [sid]
    text = caplog.text
    assert text.index(f'saga {sid}: RUNNING') < text.index(
        f'saga {sid}: COMPENSATING')
    assert res.steps[1].failure.startswith('publish failed')
    wait_for(lambda: undone(ledger(rds, celery_app, sid)) == ['a'])
