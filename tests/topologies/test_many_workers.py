"""Many workers: three ``celery worker -P prefork -c 1`` subprocesses of one
app, each consuming one queue.  Forward steps are routed per step with
``.set(queue=...)`` to ``<prefix>-a`` or ``<prefix>-b``; every undo goes to
``<prefix>-undo`` through ``compensate_undo_queue``.  Each ``t.do``/``t.undo``
run notes the worker that ran it (``tasks.note_host``), so the tests check
where every step and undo ran, not just that the sagas ended well.

Nothing consumes the default queue (``<prefix>-unrouted``): a task that
missed its route would wait there and the saga would never end.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from celery import Celery, group
from celery.canvas import Signature

from celery_compensate import (
    SagaResult,
    SagaState,
    StepState,
    UndoState,
    install,
    saga,
)
from celery_compensate.testing import WorkerProcess, delete_keys

from .. import tasks
from ..helpers import wait_for
from ..helpers import undone

pytestmark = pytest.mark.prefork
ROOT = Path(__file__).resolve().parents[2]
ROLES = ('a', 'b', 'undo')

#: the saga shape every test uses: (step name, queue role) per stage; the
#: third stage is parallel, with one member on each forward queue
STAGES: list[list[tuple[str, str]]] = [
    [('a0', 'a')], [('b0', 'b')], [('pa', 'a'), ('pb', 'b')],
    [('a1', 'a')], [('b1', 'b')],
]
ROUTE = {name: role for stage in STAGES for name, role in stage}
PLAN = [name for stage in STAGES for name, _ in stage]  # step index order


class Run(NamedTuple):
    """One execution of ``t.do`` or ``t.undo``, as noted by the task."""

    name: str
    undo: bool
    task_id: str
    role: str   # 'a', 'b', 'undo', or the unknown hostname itself


@dataclass
class Cluster:
    """The producer app, the three workers and helpers to read what ran
    where."""

    app: Celery
    rds: redis.Redis
    prefix: str
    workers: dict[str, WorkerProcess]
    nodes: dict[str, str] = field(default_factory=dict)  # node name -> role
    saga_ids: list[str] = field(default_factory=list)

    def queue(self, role: str) -> str:
        return f'{self.prefix}-{role}'

    def step(self, name: str, fail: bool = False, **kwargs: object) -> Signature:
        """``t.do(name)`` routed to the queue of its role in ``ROUTE``."""
        return tasks.do.si(name, fail=fail, **kwargs).set(
            queue=self.queue(ROUTE[name]))

    def start(self, fail: str | None = None,
              extra: Mapping[str, Mapping[str, object]] | None = None,
              ) -> SagaResult:
        """Start a saga of ``STAGES`` that fails at step ``fail`` (if any);
        ``extra[name]`` are more kwargs for step ``name`` (its undo gets
        them too)."""
        extra = extra or {}
        stages = []
        for stage in STAGES:
            sigs = [self.step(name, fail=name == fail, **extra.get(name, {}))
                    for name, _ in stage]
            stages.append(sigs[0] if len(sigs) == 1 else group(sigs))
        res = saga(*stages, app=self.app).apply_async()
        self.saga_ids.append(res.id)
        return res

    def ledger(self, saga_id: str) -> list[str]:
        return self.rds.lrange(tasks.ledger_key(self.app, saga_id), 0, -1)

    def runs(self, saga_id: str) -> list[Run]:
        """Every ``t.do``/``t.undo`` execution of the saga, in order."""
        out = []
        for entry in self.rds.lrange(tasks.hosts_key(self.app, saga_id), 0, -1):
            name, task_id, host = entry.split(' ')
            kind = task_id[len(saga_id) + 1]  # <saga>.s<i> or <saga>.u<i>.<n>
            out.append(Run(name, kind == 'u', task_id,
                           self.nodes.get(host.partition('@')[0], host)))
        return out


def _start_all(workers: list[WorkerProcess]) -> None:
    with ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(WorkerProcess.start, workers))


@pytest.fixture(scope='module')
def cluster(redis_url: str) -> Iterator[Cluster]:
    """A producer app and three prefork worker subprocesses (``-c 1``) on
    the queues ``<prefix>-a``, ``<prefix>-b`` and ``<prefix>-undo``."""
    prefix = f'cctest-mw-{uuid.uuid4().hex[:8]}'
    settings = {'compensate_key_prefix': prefix,
                'task_default_queue': f'{prefix}-unrouted',
                'compensate_undo_queue': f'{prefix}-undo'}
    app = Celery('mw-producer', broker=redis_url, set_as_current=False)
    app.conf.update(settings)
    install(app)
    env = {'COMPENSATE_TEST_BROKER': redis_url,
           'COMPENSATE_TEST_PREFIX': prefix,
           'COMPENSATE_TEST_QUEUE': settings['task_default_queue'],
           'COMPENSATE_TEST_UNDO_QUEUE': settings['compensate_undo_queue']}
    workers = {role: WorkerProcess(
        'tests.prefork_app', env, '-P', 'prefork', '-c', '1',
        '-Q', f'{prefix}-{role}', name=f'mw-{role}', cwd=ROOT)
        for role in ROLES}
    rds = redis.Redis.from_url(redis_url, decode_responses=True)
    # WorkerProcess names its node '<name>-<pid of this process>@%h'
    nodes = {f'mw-{role}-{os.getpid()}': role for role in ROLES}
    c = Cluster(app, rds, prefix, workers, nodes)
    try:
        _start_all(list(workers.values()))
        yield c
    finally:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(WorkerProcess.stop, workers.values()))
        delete_keys(rds, f'{prefix}*')
        delete_keys(rds, f'_kombu.binding*.{prefix}*')
        # the workers' result backend stores each step's result by task id
        ids = set(c.saga_ids)
        meta = [k for k in rds.scan_iter('celery-task-meta-*', count=1000)
                if k[len('celery-task-meta-'):].split('.')[0] in ids]
        if meta:
            rds.delete(*meta)
        rds.close()
        app.close()


def expected_undo_stages(fail: str | None) -> list[set[str]]:
    """The undos a saga of ``STAGES`` failing at ``fail`` must run, stage
    by stage in the order they must run (the failing stage's siblings
    run anyway and are undone first)."""
    if fail is None:
        return []
    done: list[set[str]] = []
    for stage in STAGES:
        names = {name for name, _ in stage}
        if fail in names:
            if names - {fail}:
                done.append(names - {fail})
            break
        done.append(names)
    return list(reversed(done))


def check_saga(c: Cluster, res: SagaResult, fail: str | None,
               state: SagaState) -> None:
    """Everything one saga must show: its final state, its undos once each
    in reverse stage order on the undo worker, every forward step on the
    worker of its queue, nothing run after the failing stage."""
    stages = expected_undo_stages(fail)
    assert state is (SagaState.COMPLETED if fail is None
                     else SagaState.COMPENSATED), res.id
    entries = c.ledger(res.id)
    got = undone(entries)
    # reverse stage order: chunk what finished by the expected stage sizes
    chunks, pos = [], 0
    for stage in stages:
        chunks.append(set(got[pos:pos + len(stage)]))
        pos += len(stage)
    assert chunks == stages and pos == len(got), (res.id, entries)
    names = set().union(*stages) if stages else set()
    for name in names:  # exactly once each, first attempt, no failure
        assert entries.count(f'undo-start:{name}') == 1, (res.id, entries)
        assert f'undo:{name}:{f"res-{name}"!r}' in entries, (res.id, entries)

    runs = c.runs(res.id)
    undo_runs = [r for r in runs if r.undo]
    assert sorted(r.name for r in undo_runs) == sorted(names), runs
    assert {r.role for r in undo_runs} <= {'undo'}, runs
    assert all(r.task_id.endswith('.1') for r in undo_runs), runs
    forward = [r for r in runs if not r.undo]
    assert all(r.role == ROUTE[r.name] for r in forward), runs
    ran = sorted(r.name for r in forward)
    assert len(ran) == len(set(ran)), runs   # each forward step ran once
    # every stage up to the failing one ran (all of it), nothing after it
    expected_ran: list[str] = []
    for stage in STAGES:
        expected_ran += [name for name, _ in stage]
        if fail in {name for name, _ in stage}:
            break
    assert ran == sorted(expected_ran), runs

    for name, step in zip(PLAN, res.steps, strict=True):
        assert step.state is (StepState.FAILED if name == fail
                              else StepState.DONE if name in expected_ran
                              else StepState.PENDING), step
        assert step.undo_state is (UndoState.DONE if name in names
                                   else UndoState.NONE), step
        assert step.undo_attempts == (1 if name in names else 0), step


def test_steps_run_on_the_worker_of_their_queue(cluster: Cluster) -> None:
    """Sagas whose stages alternate between queues a and b, with a parallel
    stage that has a member on each, complete; each step ran exactly once,
    on the worker consuming its queue, with the results passed along, and
    no undo ran anywhere."""
    results = [cluster.start() for _ in range(3)]
    for res in results:
        state = res.wait(timeout=20)
        check_saga(cluster, res, None, state)
        assert [s.result for s in res.steps] == [f'res-{n}' for n in PLAN]
        assert [r.role for r in cluster.runs(res.id)][:2] == ['a', 'b']


def test_failure_on_b_compensates_on_the_undo_worker(cluster: Cluster) -> None:
    """A saga failing at its last step (queue b), after steps on a and b
    and a parallel stage across both completed, is compensated: every undo
    ran once, on the undo worker only, in reverse stage order (a1, then
    the parallel pair, then b0, then a0), each with its step's result."""
    res = cluster.start(fail='b1')
    state = res.wait(timeout=20)
    check_saga(cluster, res, 'b1', state)
    entries = cluster.ledger(res.id)
    got = undone(entries)
    assert got[0] == 'a1' and set(got[1:3]) == {'pa', 'pb'}
    assert got[3:] == ['b0', 'a0']
    assert 'fail:b1' in entries and 'undo-start:b1' not in entries
    failed = [r for r in cluster.runs(res.id) if r.name == 'b1']
    assert [(r.undo, r.role) for r in failed] == [(False, 'b')]


def test_thirty_sagas_at_once_across_three_workers(cluster: Cluster) -> None:
    """30 sagas started together, six each completing or failing at b0,
    at pb (the parallel member on b, whose sibling on a is still undone),
    at a1 and at b1, all reach their final state with every undo effect
    applied exactly once in reverse stage order; no undo ran on a forward
    worker and no forward step on the undo worker (per the tasks' own
    notes and per each worker's log)."""
    fails = [None, 'b0', 'pb', 'a1', 'b1'] * 6
    started = [(cluster.start(fail=fail), fail) for fail in fails]
    deadline = time.monotonic() + 25
    for res, fail in started:
        state = res.wait(timeout=max(0.1, deadline - time.monotonic()))
        check_saga(cluster, res, fail, state)
    runs = [r for res, _ in started for r in cluster.runs(res.id)]
    assert {r.role for r in runs if r.undo} == {'undo'}
    assert {r.role for r in runs if not r.undo} == {'a', 'b'}
    assert sum(r.undo for r in runs) == sum(
        len(set().union(*expected_undo_stages(f)) if f else ()) for f in fails)
    logs = {role: w.output() for role, w in cluster.workers.items()}
    assert 't.do[' not in logs['undo'] and '] received' in logs['undo']
    assert 't.undo[' not in logs['a'] and 't.undo[' not in logs['b']


def test_undos_wait_for_a_stopped_undo_worker(cluster: Cluster) -> None:
    """The undo worker is shut down (warm) while a failing saga
    compensates: the undo it was running finishes, the next undo waits in
    the undo queue and the saga stays COMPENSATING; once an undo worker
    consumes the queue again, the saga ends COMPENSATED with each undo run
    once, all on the undo worker."""
    undo_worker = cluster.workers['undo']
    res = cluster.start(fail='b1', extra={'a1': {'undo_sleep': 1.0}})
    key = tasks.ledger_key(cluster.app, res.id)
    wait_for(lambda: 'undo-start:a1' in cluster.rds.lrange(key, 0, -1),
             timeout=15)
    try:
        # a warm shutdown: SIGTERM to the main process only (SIGTERM to a
        # pool child would kill it mid-undo); it waits for undo a1
        assert undo_worker.proc is not None
        os.kill(undo_worker.proc.pid, signal.SIGTERM)
        try:
            rc = undo_worker.proc.wait(20)
        except subprocess.TimeoutExpired:
            undo_worker.kill()
            raise
        assert rc == 0, undo_worker.output()
        entries = cluster.ledger(res.id)
        assert undone(entries) == ['a1'], entries
        # the next stage's undos were published when a1's was recorded; the
        # stopping worker may still have prefetched one, which it puts back
        # on exit ("Restoring 1 unacknowledged message(s)")
        queue = cluster.queue('undo')
        wait_for(lambda: cluster.rds.llen(queue) == 2, timeout=5)
        assert res.state is SagaState.COMPENSATING
        assert {s.undo_state for s in res.steps[2:4]} == {UndoState.QUEUED}
        assert undone(cluster.ledger(res.id)) == ['a1']
    finally:
        undo_worker.start()
    state = res.wait(timeout=20)
    check_saga(cluster, res, 'b1', state)
