"""The store's Lua scripts against a real Redis, event by event: the
sequences that are hard to force through a worker (lost replies, attempts
lost before they start, a second copy of an attempt, budgets spent in
parallel)."""
from __future__ import annotations

import json
import time

import pytest

from celery_compensate import CorruptSagaRecord, SagaState
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef, UndoSpec
from celery_compensate.store import Reply, SagaStore, shard_of
from celery_compensate.store import layout as L


def make(celery_app, stages, sid='s') -> SagaStore:
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef(n), UndoSpec('t.undo'), False)
                              for n in stage] for stage in stages])
    assert store.create(sid, plan)
    return store


def again(store: SagaStore, script, sid: str, token: str, *args):
    """Run a script as redis-py does when it resends a command whose reply
    was lost: same arguments, same token (a step's own result, which
    step_done does not send back, is the one it sent)."""
    own = args[1] if len(args) > 1 and isinstance(args[1], str) else None
    return store._outcome(script(keys=store.keys.for_saga(sid), args=[
        token, repr(time.time()), 60, *args]), own)


def test_a_resent_step_record_answers_again(celery_app, rds):
    store = make(celery_app, [['a'], ['b1', 'b2']])
    first = again(store, store.command('step_done'), 's', 'tok-1', 0, '"ra"')
    lost_reply = again(store, store.command('step_done'), 's', 'tok-1', 0, '"ra"')
    assert first.status == lost_reply.status == 'next'
    assert [s.index for s in lost_reply.forward] == [1, 2]
    # a redelivered message (another call) does not dispatch again
    assert store.step_done('s', 0, '"ra"').status == 'duplicate'
    store.step_done('s', 1, '"r1"')
    done = again(store, store.command('step_done'), 's', 'tok-2', 2, '"r2"')
    resent = again(store, store.command('step_done'), 's', 'tok-2', 2, '"r2"')
    assert (done.status, resent.status) == ('completed', 'completed')
    assert resent.old_state is SagaState.RUNNING  # so its signal still fires


def test_a_resent_claim_still_publishes_its_undos(celery_app, rds):
    store = make(celery_app, [['a'], ['b']])
    store.step_done('s', 0, '"ra"')
    claim = again(store, store.command('step_failed'), 's', 'tok', 1, 'boom')
    resent = again(store, store.command('step_failed'), 's', 'tok', 1, 'boom')
    assert claim.status == 'claimed' and resent.old_state is SagaState.RUNNING
    assert [d.step.index for d in resent.undos] == [0]
    assert store.step_failed('s', 1, 'boom').status == 'duplicate'


def test_a_resent_start_is_not_a_duplicate_saga(celery_app, rds):
    store = get_state(celery_app).store
    args = ['tok', 'x', json.dumps([L.STATE, 'RUNNING', L.N, '1',
                                    L.members(0), '0', L.lease(0), '5',
                                    L.QT, '5'])]
    start = store.command('start')
    keys = store.keys.for_saga('x')
    assert start(keys=keys, args=args) == Reply.CREATED
    assert start(keys=keys, args=args) == Reply.CREATED
    assert start(keys=keys, args=['other', *args[1:]]) == Reply.EXISTS


def test_an_attempt_lost_before_it_started_is_counted(celery_app, rds):
    """Attempt 2 is revoked (or unknown) while scheduled: it still counts,
    so the saga cannot hang between attempts."""
    store = make(celery_app, [['a'], ['b']])
    store.step_done('s', 0, '"ra"')
    store.step_failed('s', 1, 'boom')
    assert store.undo_begin('s', 0, 1, 'tok-b') == 'run'
    assert store.undo_failed('s', 0, 1, 'e1').status == 'retry'
    assert store.undo_failed('s', 0, 1, 'e1 again').status == 'stale'
    retry = store.undo_failed('s', 0, 2, 'revoked')
    assert retry.status == 'retry' and retry.undos[0].attempt == 3


def test_only_one_copy_of_an_attempt_runs(celery_app, rds):
    store = make(celery_app, [['a'], ['b']])
    store.step_done('s', 0, '"ra"')
    store.step_failed('s', 1, 'boom')
    assert store.undo_begin('s', 0, 1, 'copy-1') == 'run'
    assert store.undo_begin('s', 0, 1, 'copy-1') == 'run'    # its resend
    assert store.undo_begin('s', 0, 1, 'copy-2') == 'running'
    store.undo_done('s', 0)
    assert store.undo_begin('s', 0, 1, 'copy-3') == 'done'
    assert store.get_state('s') is SagaState.COMPENSATED


@pytest.mark.compensate_conf(compensate_undo_max_attempts=2)
def test_budgets_spent_in_parallel_fail_the_saga_once_and_stop_it(
        celery_app, rds):
    store = make(celery_app, [['a'], ['b1', 'b2'], ['c']])
    for i, r in ((0, '"ra"'), (1, '"r1"'), (2, '"r2"')):
        store.step_done('s', i, r)
    store.step_failed('s', 3, 'boom')
    for i in (1, 2):      # the first attempts fail: each is retried
        assert store.undo_failed('s', i, 1, 'e').status == 'retry'
    first = store.undo_failed('s', 1, 2, 'e')
    second = store.undo_failed('s', 2, 2, 'e')
    assert (first.old_state, first.new_state) == (
        SagaState.COMPENSATING, SagaState.COMPENSATION_FAILED)
    assert second.old_state is SagaState.COMPENSATION_FAILED  # no new transition
    assert rds.hget(store.keys.saga('s'), L.undo_state(0)) is None    # 'a' waits, not undone


def test_corrupt_record_is_a_clear_error(celery_app, rds):
    from celery_compensate import CorruptSagaRecord
    store = make(celery_app, [['a']])
    rds.hset(store.keys.saga('s'), L.spec(0), '{not json')
    with pytest.raises(CorruptSagaRecord, match="'s'"):
        store.read('s')
    rds.hset(store.keys.saga('s'), L.STATE, 'BOGUS')
    with pytest.raises(CorruptSagaRecord, match='BOGUS'):
        store.get_state('s')


def test_a_resent_late_completer_still_publishes_its_undo(celery_app, rds):
    """A step given up as failed completes after the saga was compensated;
    the reply to its record is lost and resent."""
    store = make(celery_app, [['a'], ['b1', 'b2']])
    store.step_done('s', 0, '"ra"')
    store.step_failed('s', 1, 'revoked')
    store.step_failed('s', 2, 'boom')
    store.undo_begin('s', 0, 1, 'tb')
    assert store.undo_done('s', 0).new_state is SagaState.COMPENSATED
    late = again(store, store.command('step_done'), 's', 'tok', 1, '"r1"')
    resent = again(store, store.command('step_done'), 's', 'tok', 1, '"r1"')
    assert [d.step.index for d in late.undos] == [1]
    assert [d.step.index for d in resent.undos] == [1]
    assert store.get_state('s') is SagaState.COMPENSATING
    store.undo_begin('s', 1, 1, 'tb1')
    assert store.undo_done('s', 1).new_state is SagaState.COMPENSATED


def test_a_copy_that_never_started_does_not_fail_a_running_attempt(
        celery_app, rds):
    store = make(celery_app, [['a'], ['b']])
    store.step_done('s', 0, '"ra"')
    store.step_failed('s', 1, 'boom')
    assert store.undo_begin('s', 0, 1, 'copy-1') == 'run'
    # a second copy of attempt 1 is revoked before it starts
    assert store.undo_failed('s', 0, 1, 'revoked', started=False).status == 'running'
    assert store.undo_done('s', 0).new_state is SagaState.COMPENSATED


def test_a_celery_retry_of_an_undo_is_let_in(celery_app, rds):
    store = make(celery_app, [['a'], ['b']])
    store.step_done('s', 0, '"ra"')
    store.step_failed('s', 1, 'boom')
    assert store.undo_begin('s', 0, 1, 'first') == 'run'
    assert store.undo_release('s', 0, 'someone-else') is False
    assert store.undo_release('s', 0, 'first') is True
    assert store.undo_begin('s', 0, 1, 'retry') == 'run'


@pytest.mark.compensate_conf(compensate_redis_socket_timeout=0.2,
                             compensate_record_retry_timeout=10)
def test_a_completed_step_is_recorded_through_a_redis_stall(celery_app, rds):
    """Redis stalls for longer than the socket timeout while a completion
    is recorded: the worker keeps resending the same call until Redis
    answers, instead of letting the step's failure be recorded."""
    from celery_compensate.model import TaskIdInfo
    from celery_compensate.store import new_token
    state = get_state(celery_app)
    store = make(celery_app, [['a'], ['b']])
    token = new_token()
    rds.execute_command('CLIENT', 'PAUSE', 2500, 'WRITE')
    outcome = state.coordinator.persist(
        lambda: store.step_done('s', 0, '"ra"', token),
        TaskIdInfo('s', 0, False), 'the completion of step')
    assert outcome.status == 'next' and [s.index for s in outcome.forward] == [1]
    assert store.step_done('s', 0, '"ra"').status == 'duplicate'


def test_a_step_of_an_undispatched_stage_is_not_recorded(celery_app, rds):
    """A stale or forged message for a later stage must not move the saga
    on."""
    store = make(celery_app, [['a'], ['b'], ['c']])
    assert store.step_done('s', 1, '"rb"').status == 'not-dispatched'
    assert store.step_done('s', 0, '"ra"').status == 'next'
    assert store.read('s').steps[1].state == 'R'
    assert store.step_done('s', 7, '"x"').status == 'unknown-step'


def test_listing_merges_the_shards_newest_first_page_by_page(celery_app, rds):
    """``list_sagas`` reads the per-shard indexes a page at a time and
    merges them: newest first, no repeats, filters by state."""
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('a'), UndoSpec('t.undo'), False)]])
    ids = [f'list-{n:02d}' for n in range(40)]
    for sid in ids:         # created in this order: the last is the newest
        assert store.create(sid, plan)
    for sid in ids[::4]:
        store.step_done(sid, 0, '"ok"')     # completes: leaves the live index
    assert len({shard_of(s) for s in ids}) > 10

    listed = store.list_sagas(limit=100, page=3)
    assert [e.saga_id for e in listed] == ids[::-1]
    assert [e.saga_id for e in store.list_sagas(limit=7, page=2)] == \
        ids[::-1][:7]
    running = store.list_sagas(SagaState.RUNNING, limit=100, page=3)
    assert [e.saga_id for e in running] == [
        s for s in ids[::-1] if s not in ids[::4]]
    completed = store.list_sagas(SagaState.COMPLETED, limit=100, page=3)
    assert [e.saga_id for e in completed] == ids[::4][::-1]
    assert all(e.state == 'COMPLETED' and e.summary.steps == []
               and e.summary.waiting == 0 for e in completed)

    # a damaged record is listed as such, not skipped and not fatal
    rds.hdel(store.keys.saga(ids[1]), L.N)
    entry = next(e for e in store.list_sagas(limit=100) if e.saga_id == ids[1])
    assert entry.state == 'CORRUPT' and entry.summary is None and entry.error
    assert ids[1] not in {e.saga_id for e in store.list_sagas(
        SagaState.RUNNING, limit=100)}


def test_a_listing_reads_a_bounded_summary_never_whole_records(
        celery_app, rds):
    """A saga of 2,000 steps with a megabyte of arguments costs the
    listing a few hundred bytes: its state, a few of the steps it waits
    for and how many there are, never its record."""
    store = get_state(celery_app).store
    big = TaskRef('t.big', args=('x' * 1_000_000,))
    plan = Plan.from_stages([[(big, UndoSpec('t.undo'), False)]
                             + [(TaskRef('t.small'), UndoSpec('t.undo'),
                                 False)] * 1_999])
    assert store.create('wide-list', plan)
    sent = int(rds.info('stats')['total_net_output_bytes'])
    [entry] = store.list_sagas(limit=1)
    read = int(rds.info('stats')['total_net_output_bytes']) - sent

    assert entry.saga_id == 'wide-list' and entry.state == 'RUNNING'
    assert entry.summary.waiting == 2_000
    assert [(s.index, s.task_name, s.undo_name, s.state)
            for s in entry.summary.steps] == [
        (0, 't.big', 't.undo', 'R'), (1, 't.small', 't.undo', 'R'),
        (2, 't.small', 't.undo', 'R')]
    assert read < 4_000, read       # the record is over 1 MB
    assert store.list_sagas(SagaState.COMPLETED, limit=1) == []

    # texts are cut at a character, never inside one
    store.step_failed('wide-list', 5, 'Error: ' + 'é' * 200)
    [entry] = store.list_sagas(SagaState.COMPENSATING, limit=1, width=120)
    assert entry.summary.reason == 'Error: ' + 'é' * 56 + '...'


def test_a_retry_requeues_only_failed_undos_and_answers_a_resend(celery_app,
                                                               rds):
    store = make(celery_app, [['a', 'b'], ['c']], sid='r')
    store.step_done('r', 0, '"ra"')
    store.step_done('r', 1, '"rb"')
    store.step_failed('r', 2, 'boom')     # stage 0's undos are both due
    budget = get_state(celery_app).settings.undo_max_attempts
    assert store.undo_done('r', 1).status == 'undone'
    for attempt in range(1, budget + 1):
        out = store.undo_failed('r', 0, attempt, f'e{attempt}')
    assert out.new_state is SagaState.COMPENSATION_FAILED

    first = store.retry('r', 'tok-retry')
    assert first.status == 'retried'
    assert (first.old_state, first.new_state) == (
        SagaState.COMPENSATION_FAILED, SagaState.COMPENSATING)
    assert [(d.step.index, d.attempt) for d in first.undos] == [
        (0, budget + 1)]
    # the same call resent after its reply was lost answers the same
    resent = again(store, store.command('retry'), 'r', 'tok-retry')
    assert resent.status == 'retried'
    assert resent.old_state is SagaState.COMPENSATION_FAILED
    assert [(d.step.index, d.attempt) for d in resent.undos] == [
        (0, budget + 1)]
    # a different retry of a saga that is no longer failed changes nothing
    assert store.retry('r').status == 'wrong-state'
    # the fresh budget: the next failure is not the last
    assert store.undo_failed('r', 0, budget + 1, 'again').status == 'retry'


def spend(store: SagaStore, sid: str, index: int, budget: int,
          first: int = 1) -> None:
    """Fail attempts ``first`` .. ``first + budget - 1`` of an undo."""
    for attempt in range(first, first + budget):
        store.undo_failed(sid, index, attempt, f'e{attempt}')


def test_a_retry_undoes_what_completed_while_the_saga_waited(celery_app, rds):
    """Nothing is sent while a saga is COMPENSATION_FAILED: a step of the
    stage under compensation that completes late gets its undo when an
    operator retries, and so does a given-up step that ran after all."""
    budget = get_state(celery_app).settings.undo_max_attempts
    store = get_state(celery_app).store
    plan = Plan.from_stages([
        [(TaskRef('a'), UndoSpec('t.undo'), False)],
        [(TaskRef('b1'), UndoSpec('t.undo'), False),
         (TaskRef('b2'), UndoSpec('t.undo'), False),
         (TaskRef('b3'), UndoSpec('t.undo'), False),
         (TaskRef('b4'), UndoSpec('t.undo'), True)]])
    assert store.create('w', plan)
    store.step_done('w', 0, '"a"')
    store.step_done('w', 1, '"b1"')
    assert store.step_failed('w', 2, 'boom').status == 'claimed'
    assert store.step_failed('w', 4, 'lost').undos[0].step.index == 4
    assert store.undo_done('w', 4).status == 'undone'
    spend(store, 'w', 1, budget)
    assert store.get_state('w') is SagaState.COMPENSATION_FAILED
    # while it waits: b3 completes late, b4 (undone as failed) ran after all
    assert store.step_done('w', 3, '"b3"').undos == []
    assert store.step_done('w', 4, '"b4"').undos == []

    out = store.retry('w')
    assert out.new_state is SagaState.COMPENSATING
    assert sorted((d.step.index, d.attempt) for d in out.undos) == [
        (1, budget + 1), (3, 1), (4, 2)]
    for index in (1, 3, 4):
        assert store.undo_done('w', index).status == 'undone'
    assert [d.index for d in store.read('w').steps
            if d.undo_state.name == 'QUEUED'] == [0]    # then stage 0
    assert store.undo_done('w', 0).new_state is SagaState.COMPENSATED


def test_a_reused_saga_id_stays_listed(celery_app, rds):
    """The expiry entry of a finished saga whose id is used again must not
    make the sweep drop the new saga from the listing."""
    store = make(celery_app, [['a']], sid='again')
    store.step_done('again', 0, '"ok"')
    rds.delete(store.keys.saga('again'))      # expired before the sweep trimmed
    assert rds.zscore(store.keys.ends(shard_of('again')), 'again')
    make(celery_app, [['a']], sid='again')
    rds.zadd(store.keys.ends(shard_of('again')), {'stale': 0})
    store.due(10, 3600, 0)              # a sweep: trims what expired
    assert rds.zscore(store.keys.ends(shard_of('again')), 'again') is None
    assert [e.saga_id for e in store.list_sagas()] == ['again']


def test_a_stage_of_thousands_of_steps_is_recorded_and_dispatched(celery_app,
                                                                   rds):
    """The hot path reads and writes fields in batches: a parallel stage
    larger than Lua's unpack limit still completes and hands on its
    results."""
    names = [f'm{n}' for n in range(3000)]
    store = make(celery_app, [names, ['after']], sid='wide')
    for n in range(len(names) - 1):
        assert store.step_done('wide', n, str(n)).status == 'recorded'
    out = store.step_done('wide', len(names) - 1, str(len(names) - 1))
    assert out.status == 'next'
    assert out.results == list(range(len(names)))
    assert [s.index for s in out.forward] == [len(names)]


def test_a_resent_stage_completion_leaves_a_held_next_stage_alone(
        celery_app, rds):
    """A resent completion that dispatched the next stage (its reply was
    lost) hands it out again only while no worker holds it: a held step
    was published and is running; its hold is kept."""
    store = make(celery_app, [['a'], ['b']])
    first = store.step_done('s', 0, '"ra"', token='tok-1')
    assert store.renew([('s', 1, None)]) == 1
    assert rds.hget(store.keys.saga('s'), L.held(1)) == '-'
    resent = store.step_done('s', 0, '"other"', token='tok-1')
    assert first.status is Reply.NEXT and resent.status is Reply.REPLAYED
    assert resent.forward == []
    assert rds.hget(store.keys.saga('s'), L.held(1)) == '-'


def test_a_record_without_its_next_stage_keeps_the_step_and_is_corrupt(
        celery_app, rds):
    store = make(celery_app, [['a'], ['b']])
    rds.hdel(store.keys.saga('s'), L.members(1))
    with pytest.raises(CorruptSagaRecord, match='stage 1 .* has no steps'):
        store.step_done('s', 0, '"ra"', token='tok-1')
    # the completion is recorded (its effect happened): a resend finds it
    assert rds.hget(store.keys.saga('s'), L.step_state(0)) == 'D'
    assert rds.hget(store.keys.saga('s'), L.settle_token(0)) == 'tok-1'
    assert store.step_done('s', 0, '"ra"',
                           token='tok-1').status == Reply.REPLAYED


@pytest.mark.compensate_conf(compensate_undo_retry_backoff=5.0,
                             compensate_undo_retry_backoff_max=30.0)
def test_a_lost_attempt_gets_the_backoff_of_a_failed_one(celery_app, rds):
    """The sweep counts a running attempt whose worker died as failed: the
    next one is sent after the same backoff (5 s after attempt 1, 10 s
    after attempt 2), its lease (the undo's own, until its publisher says
    it was sent) starting after it."""
    store = make(celery_app, [['a'], ['b']])
    store.step_done('s', 0, '"ra"')
    store.step_failed('s', 1, 'boom')
    key = store.keys.saga('s')
    for attempt, delay in ((1, 5.0), (2, 10.0)):
        assert store.undo_begin('s', 0, attempt, f'b{attempt}') == 'run'
        rds.hset(key, L.deadline(0), 0)            # its worker is gone
        out = store.recover('s')
        [due] = out.undos
        assert (due.attempt, due.countdown) == (attempt + 1, delay)
        sec, usec = rds.time()
        lease = float(rds.hget(key, L.deadline(0))) - (sec + usec / 1e6)
        ou = store.settings.step_timeout
        assert ou + delay - 1 < lease <= ou + delay + 0.01   # rounded to ms


def test_a_completion_does_not_send_the_step_s_own_result_back(
        celery_app, rds, monkeypatch):
    """STEP_DONE answers with the finished stage's results for the next
    stage, except the calling step's own (it has it): a big result crosses
    the network once."""
    store = make(celery_app, [['a'], ['b']])
    big = '"' + 'x' * 50_000 + '"'
    replies = []
    original = store._run

    def spy(fn, *args, **kwargs):
        reply = original(fn, *args, **kwargs)
        replies.append(reply)
        return reply

    monkeypatch.setattr(store, '_run', spy)
    out = store.step_done('s', 0, big, token='tok')
    assert replies[-1][3] == ['']                 # not sent back
    assert out.results == ['x' * 50_000]          # the caller's own


@pytest.mark.compensate_conf(compensate_queue_timeout=5,
                             compensate_step_timeout=60,
                             compensate_heartbeat_interval=1,
                             compensate_recovery_interval=1)
def test_a_sent_undo_with_a_shorter_queue_lease_lowers_the_saga_s_entry(
        celery_app, rds):
    """UNDO_SENT can move an undo's deadline earlier (the queue timeout is
    shorter than the undo's own lease): the saga's :due entry follows, or
    the sweep would look at it a lease too late."""
    store = make(celery_app, [['a'], ['b']])
    store.step_done('s', 0, '"ra"')
    store.step_failed('s', 1, 'boom')           # a's undo due: lease 60 s
    store.undo_sent('s', [(0, 1, 0.0)])         # sent: queue lease 5 s
    sec, usec = rds.time()
    now = sec + usec / 1e6
    deadline = float(rds.hget(store.keys.saga('s'), L.deadline(0)))
    score = rds.zscore(store.keys.due(shard_of('s')), 's')
    assert deadline - now < 6 and score <= deadline


def test_a_resent_completion_leaves_a_stage_that_moved_on_alone(
        celery_app, rds):
    """The completion's reply was lost and the sweep published the next
    step again (generation 2) before the completion was resent (late: a
    worker's spool): the resend sends nothing, so no second copy of the
    current generation runs.  A resend while the step is still untouched
    in the outbox hands it out again; once it is held, or has run, it is
    left alone."""
    store = make(celery_app, [['a'], ['b'], ['c']])
    store.step_done('s', 0, '"ra"', token='tok')
    key = store.keys.saga('s')
    rds.hset(key, L.deadline(1), 1)     # resent after its outbox lease
    resent = store.step_done('s', 0, '"other"', token='tok')
    assert resent.status is Reply.NEXT
    assert [s.index for s in resent.forward] == [1]
    assert resent.results == ['ra']            # read from the record
    # handed out afresh: its outbox lease starts again (the copy's header
    # says so, and a copy inside it runs without reading the record)
    assert float(rds.hget(key, L.deadline(1))) > time.time() + 1
    rds.hset(key, L.deadline(1), 1)                # the outbox lease lapsed
    assert [s.index for s in store.recover('s').forward] == [1]
    assert rds.hget(key, L.generation(1)) == '2'
    late = store.step_done('s', 0, '"ra"', token='tok')
    assert late.status is Reply.REPLAYED and late.forward == []
    assert store.receive('s', 1, None, 2, 'holder') is Reply.HELD
    assert store.step_done('s', 0, '"ra"', token='tok').forward == []
    assert rds.hget(key, L.held(1)) == 'holder'       # its hold kept
    store.step_done('s', 1, '"rb"')
    again = store.step_done('s', 0, '"ra"', token='tok')
    assert again.status is Reply.REPLAYED and again.forward == []
    assert rds.hget(key, L.step_state(1)) == 'D'
    assert rds.hget(key, L.CUR) == '2'
