"""Chaos suite: many sagas against real prefork workers and a real Redis,
with faults injected at random, then a check of every effect.

Run::

    .venv/bin/python -m tests.tools.chaos [--sagas N] [--seed S] [--workers W]
                                    [--faults a,b,...] [--json FILE]

It starts its own ``redis-server`` (AOF on; broker, saga store and ledger
in one) and ``W`` ``celery -A tests.tools.chaos_app worker -P prefork -c 2 -E``
subprocesses, submits the sagas in waves and injects, at random: forward
failures (``fail``), hard time limits (``time_limit``), SIGKILL of pool
children (``kill_child``), duplicate deliveries (``dup``), revokes of
queued or running steps and of undo attempts (``revoke``),
``SagaResult.abort()`` when the library has it (``abort``), undo failures
that recover after retries (``undo_flaky``, ``undo_kill``) or never
(``undo_never``), SIGKILL of whole workers restarted after a pause
(``kill_worker``) and one ``kill -9`` of Redis, restarted on the same
port and AOF (``kill_redis``).  Besides, faults placed between two of the
library's own actions: a step that SIGKILLs its whole worker as it starts
(``kill_early``: a moment after the worker received it), a pool child
SIGKILLed after recording its step and before publishing the next link (a
``before_task_publish`` hook, ``kill_publish``), a step that retries with
a countdown longer than its lease (``retry_wait``), a step whose result
cannot be stored (``unencodable``), undos that ``replace()`` themselves,
raise ``Ignore`` or ``retry(countdown=0)`` (``undo_replace``,
``undo_ignore``, ``undo_retry0``), and one saga with a 200-member stage
(``--wide``).  About 25% of the sagas get a pivot where one fits
(``compensate_pivot``) on a single-member stage with a stage after it: the
terminating fault, if any, is at or before it, the steps after it have no
undo and may fail or lose their pool child once (``fail_once``,
``kill_once``): they are retried and the saga completes.  Faults marked
``:fx`` hit after the
effect was applied: the outcome of the step (or undo) is in doubt.  Some
steps and undos are slow (1-2 s) so that revokes, aborts and kills hit
running tasks; a worker kill waits a moment for a worker running an undo
(else one running a step) and kills that one.  A worker that dies by
itself is restarted, as a supervisor would (and counted).  About 35% of
the sagas carry faults; ``--faults`` chooses the kinds
(``-kill_worker,-kill_redis`` drops some).

After the last wave it polls, until a deadline, for every saga to be
final, then lets queued duplicates and redeliveries drain (at most the
visibility timeout) so that a late effect is seen, and checks.  Ctrl-C or
SIGTERM stop the workers and Redis and remove the temp dir (``--keep``
keeps it: worker logs, AOF).

Every task execution and every effect is appended to a ledger in Redis
(see ``tests/chaos_app.py`` for how effects are modelled).  At the end it
checks, and prints as one line::

    chaos: 300 sagas, 1450 steps, faults 212, final 300/300, double-undo 0,
    missing-undo 0, wrong-order 0, lost 0, ...

- ``final``: sagas in COMPLETED, COMPENSATED or (only where an undo that
  never recovers ran) COMPENSATION_FAILED;
- ``double-undo``: steps whose undo effect was applied more than once;
- ``missing-undo``: steps of a compensated saga (or of the stages already
  compensated of a COMPENSATION_FAILED one) with a forward effect and no
  undo effect;
- ``wrong-order``: sagas whose undo effects are not in reverse stage order;
- ``lost``: sagas whose ``apply_async`` returned but whose record is gone;
- ``stranded``: sagas that, after the last fault that touched them, sat
  idle (nothing of theirs starting, running or ending) and not final for
  longer than the step lease + a sweep interval + 5 s (+ the queue timeout
  after an undo's ``Ignore``, or when Redis was killed while they were in
  flight: a message published in its last second may be gone);
- ``forward-undone``: sagas whose pivot was recorded done before any
  compensation, yet an undo ran or the saga did not complete;
- ``healthy-compensated``: sagas compensated although no fault touched
  them but faults after which a saga must complete (``dup``,
  ``kill_publish``, ``retry_wait``), and none of their tasks ran on a
  worker that died;
- then ``undo-without-do`` (an undo effect for a step with no forward
  effect), ``undo-not-due`` (an undo ran for a step that was never
  dispatched or had not ended, or in a COMPLETED saga), ``completed-bad``
  (a COMPLETED saga with a step lacking its effect), ``other`` (a forward
  step run for a stage never dispatched, a wrong idempotency key, an
  unexpected or missing COMPENSATION_FAILED, a ledger inconsistency) and
  information: ``orphans`` (submissions whose ``apply_async`` raised
  during the Redis outage, submitted again under a new id), ``undo-runs``
  (undo executions), ``late-copies`` (copies of a step delivered again or
  after its lease), ``worker-crashes``.

The exit status is 1 when a saga is not final or any of those counts is not
zero (details of the first problems are printed before the line), 2 when
it cannot run at all (no ``redis-server``).
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection

import redis

from celery_compensate.testing import RedisProcess, die_with_parent
from celery_compensate.store import layout as L

ROOT = Path(__file__).resolve().parents[2]

FORWARD_KINDS = ('fail', 'time_limit', 'kill_child', 'dup', 'revoke', 'abort',
                 'kill_early', 'kill_publish', 'retry_wait', 'unencodable')
UNDO_KINDS = ('undo_flaky', 'undo_kill', 'undo_never', 'undo_replace',
              'undo_ignore', 'undo_retry0')
RUN_KINDS = ('kill_worker', 'kill_redis')
ALL_FAULTS = FORWARD_KINDS + UNDO_KINDS + RUN_KINDS
#: relative weights of the per-saga faults
WEIGHTS = {'fail': 3.0, 'time_limit': 1.5, 'kill_child': 1.5, 'dup': 2.0,
           'revoke': 1.5, 'abort': 1.0, 'undo_flaky': 2.5, 'undo_kill': 1.0,
           'undo_never': 0.3, 'kill_early': 0.6, 'kill_publish': 1.5,
           'retry_wait': 1.5, 'unencodable': 1.0, 'undo_replace': 1.0,
           'undo_ignore': 0.5, 'undo_retry0': 1.0}
#: faults that end the forward run of a saga (at most one per saga)
TERMINATING = ('fail', 'time_limit', 'kill_child', 'revoke', 'abort',
               'kill_early', 'unencodable')
#: faults after which the saga must still complete (aimed at the windows
#: between the library's own actions): with only these, or none, a
#: compensated saga is ``healthy-compensated``
HEALTHY = ('dup', 'kill_publish', 'retry_wait', 'fail_once', 'kill_once')
#: faults on the steps after a pivot (retried: the saga completes)
PIVOT_FAULTS = ('fail_once', 'fail_once:fx', 'kill_once')
#: sagas that get a pivot
PIVOT_RATIO = 0.25
#: sagas some of whose stages (before any pivot) run as a nested saga
NEST_RATIO = 0.3
#: the chaos app's step lease and sweep interval (tests/tools/chaos_app.py)
#: and its queue timeout: a saga with nothing happening to it for longer
#: than lease + sweep + 5 s (+ the queue timeout after an undo's Ignore)
#: is ``stranded``
LEASE, SWEEP, QUEUE_TIMEOUT = 3.0, 1.0, 30.0
#: ledger entries that record a fault hitting a task
_FAULT_ENTRIES = ('fail', 'kill', 'kill-worker', 'kill-publish', 'retry',
                  'dup-sent',
                  'undo-fail', 'undo-kill', 'undo-ignore', 'undo-replace',
                  'undo-retry')
FAULTY_RATIO = 0.35
#: the chaos app's compensate_undo_max_attempts
UNDO_MAX_ATTEMPTS = 5
SLOW_RATIO = 0.08
WORKER_CONCURRENCY = 2
VISIBILITY_TIMEOUT = 20.0
#: the chaos app restores unacked messages every 2 s (plus slack): a
#: message a dead worker had fetched comes back this long after its death
RESTORED_WITHIN = VISIBILITY_TIMEOUT + 2.0 + 3.0

#: the counts that must be zero
MUST_BE_ZERO = ('double-undo', 'missing-undo', 'wrong-order', 'lost',
                'stranded', 'healthy-compensated', 'forward-undone',
                'undo-without-do', 'undo-not-due', 'completed-bad',
                'forward-not-due', 'bad-idem', 'cf-unexpected', 'cf-missed',
                'double-do', 'ledger-mismatch', 'orphan-ran', 'orphan-stuck')
OTHER = ('forward-not-due', 'bad-idem', 'cf-unexpected', 'cf-missed',
         'double-do', 'ledger-mismatch', 'orphan-ran', 'orphan-stuck')


class SetupError(RuntimeError):
    """The suite cannot run here."""


# -- processes -------------------------------------------------------------

class ChaosWorker:
    """A ``celery -A tests.tools.chaos_app worker`` subprocess in its own session
    (so ``os.killpg`` kills it whole), restartable; it appends to one log."""

    def __init__(self, n: int, env: dict[str, str], queue: str,
                 logdir: Path) -> None:
        self.n = n
        self.log = logdir / f'worker{n}.log'
        self.cmd = [sys.executable, '-m', 'celery', '-A', 'tests.tools.chaos_app',
                    'worker', '-n', f'chaos{n}-{os.getpid()}@%h', '-l', 'info',
                    '-P', 'prefork', '-c', str(WORKER_CONCURRENCY), '-E',
                    '-Q', queue, '--without-mingle', '--without-gossip']
        self.env = {**os.environ, **env, 'PYTHONPATH': os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
        self.proc: subprocess.Popen | None = None
        self._offset = 0
        self._ready = False
        self.starts = 0
        #: killed on purpose, a restart is scheduled
        self.down = False

    def start(self) -> None:
        """Start it; do not wait (see :meth:`ready`)."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        self._ready = False
        self.down = False
        self.starts += 1
        with self.log.open('ab') as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent())

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        if not self._ready and self.running():
            with self.log.open('rb') as f:
                f.seek(self._offset)
                self._ready = b' ready.' in f.read()
        return self._ready and self.running()

    def child_pids(self) -> set[int]:
        """Its pool children (Linux /proc; empty elsewhere)."""
        if not self.running():
            return set()
        assert self.proc is not None
        pids = set()
        for stat in Path('/proc').glob('[0-9]*/stat'):
            try:
                fields = stat.read_text().rsplit(')', 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.proc.pid:
                pids.add(int(stat.parent.name))
        return pids

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children."""
        if self.running():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown; SIGKILL the group if it takes too long."""
        if self.running():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass

    def last_error(self) -> str:
        """The last CRITICAL/ERROR line of its current run."""
        with self.log.open('rb') as f:
            f.seek(self._offset)
            lines = f.read().decode(errors='replace').splitlines()
        for line in reversed(lines):
            if 'CRITICAL/' in line or 'ERROR/MainProcess' in line:
                return line.strip()
        return lines[-1].strip() if lines else ''

    def count(self, *needles: str) -> int:
        if not self.log.exists():
            return 0
        with self.log.open('r', errors='replace') as f:
            return sum(1 for line in f if any(n in line for n in needles))

    def lines_with(self, needle: str, limit: int = 25) -> list[str]:
        if not self.log.exists():
            return []
        out = []
        with self.log.open('r', errors='replace') as f:
            for line in f:
                if needle in line:
                    out.append(f'w{self.n}: {line.rstrip()}')
                    if len(out) >= limit:
                        break
        return out


# -- plans -----------------------------------------------------------------

@dataclass
class Plan:
    """One logical saga: its shape and the faults injected into it."""

    key: int
    stages: list[list[int]]
    fwd: dict[int, str] = field(default_factory=dict)
    undo: dict[int, str] = field(default_factory=dict)
    time_limit: set[int] = field(default_factory=set)
    #: (step, mode): 'running' (when it starts), 'early' (when the saga is
    #: submitted: queued or not yet dispatched), 'undo' (its first undo
    #: attempt, when submitted)
    revoke: list[tuple[int, str]] = field(default_factory=list)
    abort: int | None = None
    #: the stage of its pivot (one member), if it has one
    pivot: int | None = None
    #: the first and last stage run as one nested saga (a step of the
    #: outer saga, numbered as the range's first step there), if any
    nest: tuple[int, int] | None = None
    #: wall times the driver revoked or aborted something of it
    touched: list[float] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)

    @property
    def n(self) -> int:
        return sum(len(s) for s in self.stages)

    def stage_of(self, i: int) -> int:
        for k, stage in enumerate(self.stages):
            if i in stage:
                return k
        raise KeyError(i)

    def never_steps(self) -> set[int]:
        return {i for i, f in self.undo.items() if f.startswith('never')}

    def nested_steps(self) -> tuple[int, int] | None:
        """The first and last logical step in the nested saga."""
        if self.nest is None:
            return None
        k0, k1 = self.nest
        return self.stages[k0][0], self.stages[k1][-1]

    def where(self, sid: str, i: int) -> tuple[str, int]:
        """The saga id and step index that logical step ``i`` has."""
        span = self.nested_steps()
        if span is None or i < span[0]:
            return sid, i
        if i <= span[1]:
            return f'{sid}~{span[0]}', i - span[0]
        return sid, i - (span[1] - span[0])


def make_plan(rng: random.Random, key: int, enabled: set[str]) -> Plan:
    n = rng.randint(3, 6)
    sizes = [1] * n
    if rng.random() < 0.45:
        g = rng.randint(2, min(3, n - 1))
        pos = rng.randrange(0, n - g + 1)
        sizes = [1] * pos + [g] + [1] * (n - g - pos)
    stages, i = [], 0
    for size in sizes:
        stages.append(list(range(i, i + size)))
        i += size
    plan = Plan(key, stages)
    for i in range(n):
        if rng.random() < SLOW_RATIO:
            plan.fwd[i] = _slow(rng)
        if rng.random() < SLOW_RATIO:   # so kills and revokes hit undos
            plan.undo[i] = _slow(rng)

    kinds = [k for k in WEIGHTS if k in enabled]
    if not kinds or rng.random() >= FAULTY_RATIO:
        if rng.random() < PIVOT_RATIO:
            add_pivot(rng, plan, None)
        if rng.random() < NEST_RATIO:
            add_nest(rng, plan)
        return plan
    chosen: list[str] = []
    for _ in range(1 if rng.random() < 0.75 else 2):
        left = [k for k in kinds if k not in chosen]
        if left:
            chosen.append(rng.choices(left, [WEIGHTS[k] for k in left])[0])
    undo_kind = next((k for k in chosen if k in UNDO_KINDS), None)
    term = next((k for k in chosen if k in TERMINATING), None)
    revoke_undo = (term == 'revoke' and undo_kind is None
                   and rng.random() < 0.25)
    floor = 0        # the terminating fault goes in a stage >= floor
    if undo_kind is not None or revoke_undo:
        j = rng.choice([i for s in stages[:-1] for i in s])
        plan.fwd.pop(j, None)
        plan.undo.pop(j, None)
        if revoke_undo or undo_kind is None:
            plan.revoke.append((j, 'undo'))
            plan.faults['revoke'] += 1
            term = None
        else:
            n_fail = rng.randint(1, 2)
            fx = ':fx' if rng.random() < 0.5 else ''
            plan.undo[j] = {'undo_flaky': f'flaky{fx}:{n_fail}',
                            'undo_kill': f'kill{fx}:1',
                            'undo_never': 'never',
                            'undo_replace': 'replace',
                            'undo_ignore': 'ignore',
                            'undo_retry0': 'retry0'}[undo_kind]
            plan.faults[undo_kind] += 1
        floor = plan.stage_of(j) + 1
        if term is None:   # the undo must be reached: fail a later step
            fallback = [k for k in ('fail', 'time_limit', 'kill_child')
                        if k in enabled]
            term = fallback[0] if fallback else None
    t = None
    if term is not None:
        t = rng.choice([i for s in stages[floor:] for i in s])
        fx = ':fx' if rng.random() < 0.5 else ''
        if term in ('fail', 'time_limit', 'kill_child'):
            plan.fwd[t] = f'{term}{fx}'
            if term == 'time_limit':
                plan.time_limit.add(t)
        elif term in ('kill_early', 'unencodable'):
            plan.fwd[t] = term
        elif term == 'revoke':
            plan.fwd[t] = _slow(rng)
            plan.revoke.append((t, 'running' if rng.random() < 0.65
                                else 'early'))
        elif term == 'abort':
            plan.fwd[t] = _slow(rng)
            plan.abort = t
        plan.faults[term] += 1
    last = plan.stage_of(t) if t is not None else len(stages) - 1
    for kind in ('dup', 'retry_wait', 'kill_publish'):
        if kind not in chosen:
            continue
        # on a step that runs: not after the failure; kill_publish on the
        # only member of a stage that has a next stage (it publishes it)
        free = [i for k, s in enumerate(stages[:last + 1]) for i in s
                if i not in plan.fwd
                and not any(i == r for r, _ in plan.revoke)
                and (kind != 'kill_publish'
                     or (len(s) == 1 and k < min(last, len(stages) - 1)))]
        if free:
            plan.fwd[rng.choice(free)] = kind
            plan.faults[kind] += 1
    if rng.random() < PIVOT_RATIO:
        add_pivot(rng, plan, t)
    if rng.random() < NEST_RATIO:
        add_nest(rng, plan)
    return plan


def add_nest(rng: random.Random, plan: Plan) -> None:
    """Run a range of stages before any pivot as one nested saga."""
    end = plan.pivot if plan.pivot is not None else len(plan.stages)
    if end < 1:
        return
    k0 = rng.randrange(0, end)
    k1 = rng.randrange(k0, end)
    plan.nest = (k0, k1)


def add_pivot(rng: random.Random, plan: Plan, t: int | None) -> None:
    """Make a single-member stage at or after the terminating fault's
    (``t``) and before the last stage the saga's pivot; the steps after it
    lose their undo (and any undo fault) and may fail or lose their pool
    child once."""
    low = plan.stage_of(t) if t is not None else 0
    undo_faulted = [plan.stage_of(i) for i, f in plan.undo.items()
                    if not f.startswith('slow')]
    undo_faulted += [plan.stage_of(i) for i, mode in plan.revoke
                     if mode == 'undo']
    if undo_faulted:
        low = max(low, max(undo_faulted) + 1)
    choices = [k for k in range(low, len(plan.stages) - 1)
               if len(plan.stages[k]) == 1]
    if not choices:
        return
    plan.pivot = rng.choice(choices)
    after = [i for s in plan.stages[plan.pivot + 1:] for i in s]
    for i in after:
        plan.undo.pop(i, None)
    if rng.random() < 0.5:
        i = rng.choice(after)
        if plan.fwd.get(i, 'slow').startswith('slow'):
            kind = rng.choice(PIVOT_FAULTS)
            plan.fwd[i] = kind
            plan.faults[kind.split(':')[0]] += 1


def wide_plan(key: int, width: int) -> Plan:
    """One saga with a parallel stage of ``width`` members, no faults."""
    return Plan(key, [[0], list(range(1, width + 1)), [width + 1]])


def _slow(rng: random.Random) -> str:
    fx = ':fx' if rng.random() < 0.5 else ''
    return f'slow{fx}:{rng.uniform(1.0, 2.0):.2f}'


@dataclass
class Attempt:
    """One submission of a plan (a saga id); one that raised is not
    acknowledged and the plan is submitted again under a new number."""

    no: int
    plan: Plan
    sid: str
    acked: bool = False
    error: str | None = None
    state: str | None = None
    aborted: bool = False
    #: wall time the driver first saw it final
    final_at: float | None = None
    submitted_at: float = 0.0


# -- the ledger --------------------------------------------------------------

class StepLog:
    def __init__(self) -> None:
        self.count: Counter = Counter()
        self.pos: dict[str, list[int]] = defaultdict(list)
        self.entries: list[tuple[int, str, dict]] = []

    def add(self, pos: int, kind: str, data: dict) -> None:
        self.count[kind] += 1
        self.pos[kind].append(pos)
        self.entries.append((pos, kind, data))


#: ledger entries that open and close an execution
_OPENS = ('start', 'undo-start')
_CLOSES = ('end', 'fail', 'kill', 'undo-end', 'undo-fail', 'undo-kill')


def parse_ledger(lines: list[str]) -> dict[int, dict[int, StepLog]]:
    per: dict[int, dict[int, StepLog]] = defaultdict(
        lambda: defaultdict(StepLog))
    for pos, line in enumerate(lines):
        kind, _, payload = line.partition(' ')
        data = json.loads(payload)
        per[int(data['s'])][int(data['i'])].add(pos, kind, data)
    return per


@dataclass
class Analysis:
    counts: Counter
    problems: list[dict[str, Any]]
    info: Counter
    per: dict[int, dict[int, StepLog]]


def analyse(attempts: Any, lines: list[str], effects: dict[str, str],
            records: dict[str, Any],
            dead_pids: Collection[int] = ()) -> Analysis:
    """Check every saga against the ledger.

    Arguments:
        attempts: the :class:`Attempt` of every submission.
        lines: the ledger (``<kind> <json>`` entries, in order).
        effects: the effect counters (``do:<no>:<i>``, ``undo:<no>:<i>``).
        records: saga id -> its ``SagaRecord`` (``None``: not found).
        dead_pids: pool children of workers that died: an undo whose
            every attempt started in one of them and never ended spent its
            budget on dead workers, so COMPENSATION_FAILED is expected.
    """
    from celery_compensate.model import (
        FINAL_STATES,
        SagaState,
        StepState,
        UndoState,
        idempotency_key,
    )
    per = parse_ledger(lines)
    counts: Counter = Counter({k: 0 for k in MUST_BE_ZERO})
    problems: list[dict[str, Any]] = []
    info: Counter = Counter()

    def problem(kind: str, att: Attempt, step: int | None,
                detail: str) -> None:
        counts[kind] += 1
        problems.append({'kind': kind, 'saga': att.sid, 'no': att.no,
                         'step': step, 'detail': detail})

    for att in attempts:
        plan, logs = att.plan, per.get(att.no, {})
        rec = records.get(att.sid)
        if rec is None:
            if att.acked:
                problem('lost', att, None, 'apply_async returned but the '
                        'saga record is gone')
            elif logs:
                # a step ran for a saga that was never recorded: the record
                # must come before anything is published
                problem('orphan-ran', att, None, 'tasks ran for a saga '
                        'whose apply_async raised and that has no record')
            continue
        if not att.acked:
            # apply_async raised, yet the record was written (its reply was
            # lost): a real saga, which must finish like any other
            info['orphans-recorded'] += 1
            if rec.state not in FINAL_STATES:
                problem('orphan-stuck', att, None, 'a recorded saga whose '
                        'apply_async raised never reached a final state')
                continue
        state = rec.state
        never_ran = {i for i in plan.never_steps()
                     if logs.get(i) and logs[i].count['undo-start']}
        # every attempt lost with its worker: the budget is spent too
        never_ran |= {i for i, lg in logs.items()
                      if lg.count['undo-start'] >= UNDO_MAX_ATTEMPTS
                      and not lg.count['undo-end']
                      and all(d.get('pid') in dead_pids
                              for _, kind, d in lg.entries
                              if kind == 'undo-start')}
        if att.acked and never_ran:
            info['expected-cf'] += 1
        for i in range(plan.n):
            lg = logs.get(i) or StepLog()
            srec = rec.steps[i]
            do, und = lg.count['do'], lg.count['undo']
            info['undo-runs'] += lg.count['undo-start']
            info['undo-effects'] += und
            info['undo-dedup'] += lg.count['undo-dedup']
            info['redelivered-runs'] += sum(
                1 for _, kind, d in lg.entries
                if d.get('rd') and kind in ('start', 'undo-start'))
            if do > 1:
                problem('double-do', att, i, f'forward effect applied {do} '
                        'times')
            if und > 1:
                problem('double-undo', att, i, f'undo effect applied {und} '
                        'times')
            if und and not do:
                problem('undo-without-do', att, i, 'undo effect applied '
                        'without a forward effect')
            if int(effects.get(f'undo:{att.no}:{i}', 0)) != und or (
                    (f'do:{att.no}:{i}' in effects) != bool(do)):
                problem('ledger-mismatch', att, i, 'effect counters and '
                        'ledger disagree')
            if lg.count['start'] and srec.state is StepState.PENDING:
                problem('forward-not-due', att, i, 'ran although its stage '
                        'was never dispatched')
            if lg.count['undo-start'] and (
                    state is SagaState.COMPLETED or srec.state in (
                        StepState.PENDING, StepState.RUNNING)):
                problem('undo-not-due', att, i, f'undo ran for a step '
                        f'{srec.state.name} in a {state.value} saga')
            sid, index = plan.where(att.sid, i)
            for _, kind, d in lg.entries:
                if kind == 'undo-start' and (
                        d.get('idem') != idempotency_key(sid, index)
                        or d.get('sid') != sid):
                    problem('bad-idem', att, i, f'undo got idempotency key '
                            f'{d.get("idem")!r}, saga id {d.get("sid")!r}')
                    break
        if plan.pivot is not None:
            p = plan.stages[plan.pivot][0]
            pivot = rec.steps[p]
            started = rec.compensation_started
            passed = pivot.state is StepState.DONE and (
                started is None or (pivot.settled_at or 0.0) < started)
            undone_any = [i for i, lg in logs.items()
                          if lg.count['undo-start']]
            if passed and undone_any:
                problem('forward-undone', att, undone_any[0], 'an undo ran '
                        'although the pivot was recorded done first')
            elif passed and state in FINAL_STATES \
                    and state is not SagaState.COMPLETED:
                problem('forward-undone', att, p, f'{state.value} although '
                        'its pivot was recorded done first')
            info['pivots-passed' if passed else 'pivots-not-passed'] += 1
        if plan.nest is not None:
            info['nested'] += 1
            if state is not SagaState.COMPLETED:
                info['nested-compensated'] += 1
        if state is SagaState.COMPLETED:
            bad = [i for i in range(plan.n)
                   if (logs.get(i) or StepLog()).count['do'] != 1
                   or (logs.get(i) or StepLog()).count['undo']]
            if bad:
                problem('completed-bad', att, bad[0], f'COMPLETED but steps '
                        f'{bad} lack their effect or were undone')
        elif state in (SagaState.COMPENSATED, SagaState.COMPENSATION_FAILED):
            # stages >= floor must be undone; below floor - 1 untouched
            floor = 0
            if state is SagaState.COMPENSATION_FAILED:
                failed = [s.index for s in rec.steps
                          if s.undo_state is UndoState.FAILED]
                if not never_ran or not set(failed) <= never_ran:
                    problem('cf-unexpected', att, failed[0] if failed
                            else None, f'COMPENSATION_FAILED with the undo '
                            f'of steps {failed} failed; undos that never '
                            f'recover that ran: {sorted(never_ran)}')
                if failed:
                    floor = max(plan.stage_of(i) for i in failed) + 1
            elif never_ran:
                problem('cf-missed', att, min(never_ran), 'an undo that '
                        'always fails ran, yet the saga is COMPENSATED')
            for i in range(plan.n):
                lg = logs.get(i) or StepLog()
                k = plan.stage_of(i)
                if lg.count['do'] and not lg.count['undo'] and k >= floor:
                    late = any(p < lg.pos['do'][-1]
                               for p in lg.pos['undo-start'])
                    problem('missing-undo', att, i,
                            'forward effect never undone' + (
                                ' (applied after its undo ran)'
                                if late else ''))
                elif lg.count['undo'] and k < floor - 1:
                    problem('wrong-order', att, i, 'undone although the '
                            'stage after it is not compensated')
            # undo effects in reverse stage order
            undos = sorted((p, plan.stage_of(i)) for i, lg in logs.items()
                           for p in lg.pos['undo'])
            for (p1, k1), (p2, k2) in itertools.pairwise(undos):
                if k2 > k1:
                    problem('wrong-order', att, None, f'undo of stage {k2} '
                            f'(ledger #{p2}) after one of stage {k1} '
                            f'(#{p1})')
                    break
    return Analysis(counts, problems, info, per)


def flat_record(rec: Any, plan: Plan, app: Any) -> Any:
    """The outermost saga's record with its nested saga's step replaced
    by the nested saga's steps, numbered as the plan's logical steps (a
    nested saga never started: its steps PENDING)."""
    import dataclasses

    from celery_compensate import SagaNotFound, SagaResult
    from celery_compensate.model import StepState, UndoState
    span = plan.nested_steps()
    if span is None:
        return rec
    first, last = span
    outer = rec.steps[first]
    try:
        inner = SagaResult(outer.child, app=app).info().steps
    except SagaNotFound:
        inner = [dataclasses.replace(
            outer, index=i, state=StepState.PENDING,
            undo_state=UndoState.NONE, undo_attempts=0, child=None)
            for i in range(last - first + 1)]
    steps = [*rec.steps[:first],
             *(dataclasses.replace(s, index=first + n)
               for n, s in enumerate(inner)),
             *(dataclasses.replace(s, index=s.index + last - first)
               for s in rec.steps[first + 1:])]
    return dataclasses.replace(rec, steps=steps)


# -- the driver --------------------------------------------------------------

class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed = args.seed
        self.rng = random.Random(self.seed)
        self.enabled = set(args.faults)
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix='compensate-chaos-'))
        self.run_id = uuid.uuid4().hex[:6]
        self.prefix = f'chaos{self.run_id}'
        self.queue = f'{self.prefix}-q'
        self.redis: RedisProcess | None = None
        self.workers: list[ChaosWorker] = []
        self.events: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()
        self._numbers = itertools.count()
        self.attempts: dict[int, Attempt] = {}
        self.done_kinds: Counter = Counter()     # driver faults performed
        self.on_start: dict[tuple[int, int], tuple[str, Attempt]] = {}
        #: (task id, pid) -> (when seen, kind) of executions still running
        self.busy: dict[tuple[str, int], tuple[float, str]] = {}
        self._ledger_offset = 0
        self.plans: list[Plan] = []
        self.pending_restarts = 0
        self.timings: dict[str, float] = {}
        self.app: Any = None
        self.ca: Any = None
        self.r: Any = None   # a client with decode_responses
        self.warnings: list[str] = []
        self.stopping = False
        self.in_flight: tuple[int, int] = (-1, -1)
        #: pool children seen per worker, and those of workers that died
        #: (killed or exited): what ran there was touched by that fault
        self.children: dict[int, set[int]] = defaultdict(set)
        self.killed_pids: dict[int, float] = {}
        #: (killed, back) wall times of the Redis kills: every saga in
        #: flight then met them
        self.redis_kills: list[tuple[float, float]] = []
        #: wall times of whole-worker deaths (killed or exited)
        self.worker_deaths: list[float] = []

    # -- helpers ----------------------------------------------------------

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f'[{self.clock():6.1f}s] {text}', flush=True)

    def warn(self, text: str) -> None:
        self.warnings.append(f'[{self.clock():.1f}s] {text}')

    def at(self, when: float, fn: Callable[[], object]) -> None:
        heapq.heappush(self.events, (when, next(self._seq), fn))

    def run_due(self) -> None:
        while self.events and self.events[0][0] <= self.clock():
            _, _, fn = heapq.heappop(self.events)
            fn()

    # -- setup ----------------------------------------------------------------

    def setup(self) -> None:
        if not shutil.which('redis-server'):
            raise SetupError(
                'redis-server is not on PATH: the chaos suite needs a Redis '
                'it can kill -9 and restart (apt-get install redis-server)')
        self.redis = RedisProcess('--appendfsync', 'everysec',
                                  '--maxmemory-policy', 'noeviction',
                                  workdir=self.tmp).start()
        env = {'CHAOS_BROKER': self.redis.url, 'CHAOS_PREFIX': self.prefix,
               'CHAOS_QUEUE': self.queue,
               'CHAOS_VISIBILITY': str(VISIBILITY_TIMEOUT)}
        os.environ.update(env)
        import tests.tools.chaos_app as ca  # configured by the environment
        self.ca, self.app = ca, ca.app
        self.r = redis.Redis.from_url(self.redis.url, decode_responses=True,
                                      socket_timeout=5,
                                      socket_connect_timeout=2)
        self.workers = [ChaosWorker(n, env, self.queue, self.tmp)
                        for n in range(self.args.workers)]
        for w in self.workers:
            w.start()
        deadline = time.monotonic() + 60
        while not all(w.ready() for w in self.workers):
            for w in self.workers:
                if not w.running():
                    raise SetupError('worker did not start:\n' + w.log.read_text(
                        errors='replace')[-3000:])
            if time.monotonic() > deadline:
                raise SetupError('workers not ready after 60s')
            time.sleep(0.05)
        self.timings['setup'] = self.clock()

    # -- faults of the run ---------------------------------------------------

    def kill_worker(self, tries: int = 0) -> None:
        if self.stopping:
            return
        alive = [w for w in self.workers if w.ready()]
        if len(alive) < len(self.workers):
            if tries < 30:   # one at a time: retry when all are up
                self.at(self.clock() + 0.5,
                        partial(self.kill_worker, tries + 1))
            return
        # aim at a worker running something, an undo if possible (kill
        # children and time limits leave stale entries: recent ones only)
        now = self.clock()
        running = {pid: (kind, tid) for (tid, pid), (seen, kind)
                   in self.busy.items() if now - seen < 2.5}
        hits = {w.n: [running[p] for p in w.child_pids() if p in running]
                for w in alive}
        undo = [w for w in alive if any(k == 'undo-start'
                                        for k, _ in hits[w.n])]
        busy = [w for w in alive if hits[w.n]]
        if not undo and tries < 8:     # wait a little for a running undo
            self.at(now + 0.5, partial(self.kill_worker, tries + 1))
            return
        w = self.rng.choice(undo or busy or alive)
        w.down = True
        self.children[w.n] |= w.child_pids()
        w.kill()
        self.died(w)
        self.done_kinds['kill_worker'] += 1
        pause = self.rng.uniform(1.0, 3.0)
        what = ', '.join(f'{k} {t}' for k, t in hits[w.n]) or 'idle'
        self.say(f'SIGKILL worker {w.n} (whole group; running: {what}); '
                 f'restart in {pause:.1f}s')
        self.pending_restarts += 1

        def restart() -> None:
            w.start()
            self.pending_restarts -= 1
        self.at(self.clock() + pause, restart)

    def supervise(self) -> None:
        """Restart a worker that exited by itself, as a process supervisor
        would (Celery/kombu can die of a broker outage: 'Unrecoverable
        error')."""
        now = time.time()
        if now - getattr(self, '_children_seen', 0.0) > 0.2:
            self._children_seen = now
            for w in self.workers:
                if w.running():
                    self.children[w.n] |= w.child_pids()
        for w in self.workers:
            if w.down or w.running() or w.proc is None:
                continue
            self.died(w)
            code = w.proc.returncode
            self.done_kinds['worker-crash'] += 1
            self.warn(f'worker {w.n} exited by itself (status {code}): '
                      f'{w.last_error()[:300]}')
            self.say(f'worker {w.n} exited by itself (status {code}); '
                     'restarting it')
            w.start()

    def died(self, w: ChaosWorker) -> None:
        """Worker ``w`` is gone: what ran in its pool children was touched
        by that fault (at this time)."""
        now = time.time()
        self.worker_deaths.append(now)
        for pid in self.children.pop(w.n, set()):
            self.killed_pids.setdefault(pid, now)

    def kill_redis(self) -> None:
        assert self.redis is not None
        if self.stopping:
            return
        self.redis.kill()
        killed_at = time.time()
        self.done_kinds['kill_redis'] += 1
        pause = self.rng.uniform(1.0, 2.0)
        self.say(f'kill -9 redis-server; restart in {pause:.1f}s')
        self.pending_restarts += 1

        def restart() -> None:
            assert self.redis is not None
            self.redis.start(wait=False)
            self.redis_kills.append((killed_at, time.time()))
            self.pending_restarts -= 1
            self.say('redis-server restarted (AOF reload)')
        self.at(self.clock() + pause, restart)

    def revoke(self, task_id: str) -> None:
        if self.redis is None or not self.redis.running():
            # kombu retries a broadcast forever while the broker is down:
            # the driver would never get to restart Redis
            self.warn(f'revoke {task_id} skipped: Redis is down')
            return
        try:
            from celery_compensate.model import parse_task_id
            info = parse_task_id(task_id)
            for a in self.attempts.values():
                if info is not None and a.sid == info.saga_id.partition('~')[0]:
                    a.plan.touched.append(time.time())
            self.app.control.revoke(task_id, terminate=True,
                                    signal=self.rng.choice(('SIGTERM',
                                                            'SIGKILL')))
            self.done_kinds['revoke'] += 1
        except Exception as exc:  # noqa: BLE001 - Redis may be down
            self.warn(f'revoke {task_id} failed: {exc!r}')

    def abort(self, att: Attempt) -> None:
        from celery_compensate import SagaResult
        res = SagaResult(att.sid, app=self.app)
        if self.redis is None or not self.redis.running():
            self.warn(f'abort {att.sid} skipped: Redis is down')
            return
        att.plan.touched.append(time.time())
        try:
            if res.abort():
                att.aborted = True
                self.done_kinds['abort'] += 1
            else:   # it had ended already
                self.done_kinds['abort-late'] += 1
        except Exception as exc:  # noqa: BLE001
            self.warn(f'abort {att.sid} failed: {exc!r}')

    # -- submission -------------------------------------------------------------

    def build(self, plan: Plan, no: int) -> list[Any]:
        from celery import group
        ca = self.ca
        sigs = []
        for stage in plan.stages:
            members = []
            for i in stage:
                sig = ca.step.si(no, i, plan.fwd.get(i, ''))
                if plan.pivot is not None and plan.stage_of(i) > plan.pivot:
                    # retried, never undone
                    sig = sig.set(compensate_with=None,
                                  compensate_on_failure=False)
                else:
                    sig = sig.set(compensate_with=ca.undo.si(
                        no, i, plan.undo.get(i, '')))
                if plan.pivot is not None and plan.stage_of(i) == plan.pivot:
                    sig = sig.set(compensate_pivot=True)
                if i in plan.time_limit:
                    sig = sig.set(time_limit=1)
                members.append(sig)
            sigs.append(members[0] if len(members) == 1 else group(members))
        if plan.nest is not None:
            from celery_compensate import saga
            k0, k1 = plan.nest
            sigs[k0:k1 + 1] = [saga(*sigs[k0:k1 + 1], app=self.app)]
        return sigs

    def submit_wave(self, wave: list[Plan]) -> None:
        """Submit a wave; after a failure (Redis down) the rest of the wave
        waits, so the loop stays responsive."""
        for n, plan in enumerate(wave):
            if not self.submit(plan):
                rest = wave[n + 1:]
                if rest:
                    self.at(self.clock() + 0.5,
                            partial(self.submit_wave, rest))
                return

    def submit(self, plan: Plan) -> bool:
        from celery_compensate import InvalidSaga, saga
        from celery_compensate.model import step_task_id, undo_task_id
        no = next(self._numbers)
        att = Attempt(no, plan, f'{self.prefix}-{no}')
        att.submitted_at = time.time()
        self.attempts[no] = att
        try:
            saga(*self.build(plan, no), app=self.app).apply_async(
                saga_id=att.sid)
        except InvalidSaga:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis down: not acked
            att.error = f'{type(exc).__name__}: {exc}'
            self.at(self.clock() + 0.5, partial(self.submit, plan))
            return False
        att.acked = True
        now = self.clock()
        for i, mode in plan.revoke:
            if mode == 'early':
                tid = step_task_id(*plan.where(att.sid, i))
                self.at(now + self.rng.uniform(0, 0.3),
                        partial(self.revoke, tid))
            elif mode == 'undo':
                tid = undo_task_id(*plan.where(att.sid, i), 1)
                self.at(now + self.rng.uniform(0, 0.3),
                        partial(self.revoke, tid))
            else:
                self.on_start[(no, i)] = ('revoke', att)
        if plan.abort is not None:
            self.on_start[(no, plan.abort)] = ('abort', att)
        return True

    def read_ledger(self) -> None:
        """Follow the ledger: which task runs in which pool child (for the
        worker kills), and fire the revokes and aborts waiting for a step
        to start."""
        from celery_compensate.model import step_task_id
        assert self.r is not None
        try:
            new = self.r.lrange(self.ca.LEDGER, self._ledger_offset, -1)
        except redis.RedisError:
            return
        self._ledger_offset += len(new)
        now = self.clock()
        for line in new:
            kind, _, payload = line.partition(' ')
            if kind not in _OPENS and kind not in _CLOSES:
                continue
            data = json.loads(payload)
            run = (data['t'], data['pid'])
            if kind in _CLOSES:
                self.busy.pop(run, None)
                continue
            self.busy[run] = (now, kind)
            if kind != 'start':
                continue
            hit = self.on_start.pop((int(data['s']), int(data['i'])), None)
            if hit is None:
                continue
            what, att = hit
            delay = self.rng.uniform(0.05, 0.4)
            if what == 'revoke':
                tid = step_task_id(*att.plan.where(att.sid, int(data['i'])))
                self.at(self.clock() + delay, partial(self.revoke, tid))
            else:
                self.at(self.clock() + delay, partial(self.abort, att))

    def poll_states(self) -> None:
        from celery_compensate.appstate import get_state
        from celery_compensate.model import FINAL_STATES
        assert self.r is not None
        store = get_state(self.app).store
        # also submissions whose apply_async raised: their record may exist
        todo = [a for a in self.attempts.values()
                if a.state not in FINAL_STATES]
        if not todo:
            return
        try:
            pipe = self.r.pipeline(transaction=False)
            for a in todo:
                pipe.hget(store.keys.saga(a.sid), L.STATE)
            states = pipe.execute()
        except redis.RedisError:
            return
        for a, state in zip(todo, states, strict=True):
            a.state = state
            if state in FINAL_STATES and a.final_at is None:
                a.final_at = time.time()

    def acked(self) -> list[Attempt]:
        return [a for a in self.attempts.values() if a.acked]

    def all_final(self) -> bool:
        from celery_compensate.model import FINAL_STATES
        acked = self.acked()
        return (len(acked) == len(self.plans)
                and all(a.state in FINAL_STATES for a in acked)
                and all(a.state is None or a.state in FINAL_STATES
                        for a in self.attempts.values() if not a.acked))

    # -- the run --------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        self.say(f'chaos: {args.sagas} sagas, seed {self.seed}, '
                 f'{args.workers} workers x {WORKER_CONCURRENCY}, faults '
                 f'{",".join(k for k in ALL_FAULTS if k in self.enabled)}')
        self.setup()
        assert self.redis is not None
        self.say(f'redis {self.redis.url} (AOF in {self.tmp}), workers ready')

        self.plans = [make_plan(self.rng, k, self.enabled)
                      for k in range(args.sagas)]
        if args.wide:
            # one saga with a wide parallel stage, among the others
            at = self.rng.randrange(len(self.plans) + 1)
            self.plans.insert(at, wide_plan(len(self.plans), args.wide))
        span = args.duration if args.duration else max(12.0, 0.3 * args.sagas)
        start = self.clock()
        left = list(self.plans)
        waves = []
        while left:
            size = self.rng.randint(1, 8)
            waves.append(left[:size])
            left = left[size:]
        for n, wave in enumerate(waves):
            when = start + span * (n + self.rng.random() * 0.5) / len(waves)
            self.at(when, partial(self.submit_wave, wave))
        if 'kill_worker' in self.enabled:
            kills = max(2, round(span / 15))
            for _ in range(kills):
                self.at(start + self.rng.uniform(0.1, 0.9) * span,
                        self.kill_worker)
        if 'kill_redis' in self.enabled:
            self.at(start + self.rng.uniform(0.35, 0.65) * span,
                    self.kill_redis)
        timeout = args.timeout if args.timeout else min(300.0,
                                                        30.0 + args.sagas)
        deadline = start + span + timeout
        last_poll = last_report = 0.0
        while True:
            self.run_due()
            self.supervise()
            self.read_ledger()
            now = self.clock()
            if now - last_poll > 0.3:
                self.poll_states()
                last_poll = now
            if self.all_final() and not self.pending_restarts:
                break
            if now > deadline:
                self.say(f'deadline: {timeout:.0f}s after the last wave, '
                         'not every saga is final')
                break
            if now - last_report > 10:
                states = Counter(a.state or '?' for a in self.acked())
                self.say(f'{len(self.acked())}/{len(self.plans)} submitted, '
                         f'states {dict(sorted(states.items()))}')
                last_report = now
            time.sleep(0.02)
        self.timings['run'] = self.clock() - start
        self.stopping = True     # run faults still scheduled are dropped
        self.quiesce()
        return self.check()

    def quiesce(self) -> None:
        """Let duplicates and redeliveries still queued run before counting,
        so a late effect is seen: wait for the queue and the unacked
        messages to drain (at most the visibility timeout and a bit)."""
        assert self.r is not None
        start = self.clock()
        deadline = start + VISIBILITY_TIMEOUT + 8
        left: tuple[int, int] = (-1, -1)
        while self.clock() < deadline:
            self.run_due()
            self.supervise()
            try:
                left = (self.r.llen(self.queue), self.r.hlen('unacked'))
            except redis.RedisError:
                left = (-1, -1)
            if left == (0, 0) and all(w.ready() for w in self.workers):
                break
            time.sleep(0.1)
        else:
            self.warn(f'still in flight after the run: queue {left[0]}, '
                      f'unacked {left[1]}')
        self.in_flight = left
        self.timings['quiesce'] = self.clock() - start

    # -- the check ------------------------------------------------------------

    def check(self) -> int:
        from celery_compensate import SagaNotFound, SagaResult
        from celery_compensate.model import FINAL_STATES
        assert self.r is not None
        lines = self.r.lrange(self.ca.LEDGER, 0, -1)
        effects = self.r.hgetall(self.ca.EFFECTS)
        records: dict[str, Any] = {}
        for att in self.attempts.values():
            try:
                records[att.sid] = flat_record(
                    SagaResult(att.sid, app=self.app).info(), att.plan,
                    self.app)
                att.state = records[att.sid].state.value
            except SagaNotFound:
                records[att.sid] = None
                att.state = None
        result = analyse(self.attempts.values(), lines, effects, records,
                         set(self.killed_pids))
        counts, problems, info = result.counts, result.problems, result.info
        stranded, healthy = self.windows(lines)
        counts['stranded'] = len(stranded)
        counts['healthy-compensated'] = len(healthy)
        for a, why in stranded + healthy:
            problems.append({'kind': why, 'saga': a.sid, 'no': a.no,
                             'step': None, 'detail': (
                                 f'{a.state}, faults '
                                 f'{dict(a.plan.faults) or "none"}, forward '
                                 f'{a.plan.fwd}, undo {a.plan.undo}')})

        acked = self.acked()
        finals = {s.value for s in FINAL_STATES}
        final = sum(1 for a in acked if a.state in finals)
        states = Counter(a.state for a in acked)
        cf = states.get('COMPENSATION_FAILED', 0)
        # per-step faults as planned; revokes, aborts and kills as done
        faults: Counter = Counter()
        for a in acked:
            faults.update(a.plan.faults)
        for k in ('revoke', 'abort'):
            faults[k] = 0
        faults.update(self.done_kinds)
        crashes = faults.pop('worker-crash', 0)
        info['abort-late'] = faults.pop('abort-late', 0)
        faults = +faults
        info['worker-crashes'] = crashes
        info['redelivered-skipped'] = sum(
            w.count('not run again', 'redelivered but already')
            for w in self.workers)
        total_faults = sum(faults.values())
        steps = sum(a.plan.n for a in acked)
        orphans = [a for a in self.attempts.values() if not a.acked]
        bad = final < len(self.plans) or any(counts[k] for k in MUST_BE_ZERO)
        elapsed = self.clock()
        other = sum(counts[k] for k in OTHER)

        # details first, the summary line last
        stuck = [a for a in acked if a.state not in finals]
        if problems or stuck:
            self.details(problems, records, result.per, stuck)
        for w in self.warnings[:10]:
            self.say(f'warning: {w}')
        self.say(f'faults: {dict(sorted(faults.items()))}; states '
                 f'{dict(sorted((k or "missing", v) for k, v in states.items()))}'
                 f'; timings {({k: round(v, 1) for k, v in self.timings.items()})}')
        line = (
            f'chaos: {len(self.plans)} sagas, {steps} steps, faults '
            f'{total_faults}, final {final}/{len(self.plans)}, double-undo '
            f'{counts["double-undo"]}, missing-undo {counts["missing-undo"]}, '
            f'wrong-order {counts["wrong-order"]}, lost {counts["lost"]}, '
            f'stranded {counts["stranded"]}, healthy-compensated '
            f'{counts["healthy-compensated"]}, forward-undone '
            f'{counts["forward-undone"]}, '
            f'undo-without-do {counts["undo-without-do"]}, undo-not-due '
            f'{counts["undo-not-due"]}, completed-bad '
            f'{counts["completed-bad"]}, other {other}, compensation-failed '
            f'{cf} (expected {info["expected-cf"]}), orphans {len(orphans)}, '
            f'nested {info["nested"]} ({info["nested-compensated"]} not '
            f'completed), undo-runs {info["undo-runs"]}, late-copies '
            f'{info["redelivered-runs"] + info["redelivered-skipped"]}, '
            f'worker-crashes {crashes}, time {elapsed:.0f}s')
        print(line, flush=True)
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({
                'line': line, 'ok': not bad, 'seed': self.seed,
                'sagas': len(self.plans), 'steps': steps,
                'faults': total_faults, 'fault_kinds': dict(faults),
                'enabled': sorted(self.enabled), 'final': final,
                'states': dict(states), 'counts': dict(counts),
                'compensation_failed': cf,
                'expected_cf': info['expected-cf'],
                'orphans': len(orphans), 'info': dict(info),
                'problems': problems, 'warnings': self.warnings,
                'in_flight': list(self.in_flight),
                'timings': self.timings, 'elapsed': elapsed,
            }, indent=1, default=str))
        return 1 if bad else 0

    def windows(self, lines: list[str]
                ) -> tuple[list[tuple[Attempt, str]],
                           list[tuple[Attempt, str]]]:
        """The sagas ``stranded`` (after the last fault that touched them,
        not final and idle, nothing of them running or starting, for longer
        than lease + sweep + 5 s) and ``healthy-compensated``
        (compensated although only faults after which a saga must complete
        touched them, or none).

        A fault touches a saga when the ledger shows one of its tasks
        failing, being killed or stepping aside, when one of its tasks ran
        in a pool child of a worker that died, or when Redis was killed
        while it was not final.  A whole worker's death also touches a
        saga in flight then whose message that worker's broker client had
        fetched but never handed to Celery (no receipt can exist for it):
        seen as the saga idle across the death until the visibility timeout
        restored the message or its queue lease sent it again; such a saga
        may wait the queue timeout."""
        from celery_compensate.model import FINAL_STATES
        finals = {s.value for s in FINAL_STATES}
        touched: dict[int, list[float]] = defaultdict(list)
        activity: dict[int, list[float]] = defaultdict(list)
        on_dead_worker: set[int] = set()
        for line in lines:
            kind, _, payload = line.partition(' ')
            try:
                data = json.loads(payload)
                no = int(data['s'])
            except (ValueError, KeyError, TypeError):
                continue
            activity[no].append(float(data['ts']))
            if kind in _FAULT_ENTRIES:
                touched[no].append(float(data['ts']))
            killed = self.killed_pids.get(data.get('pid'))
            if killed is not None and float(data['ts']) <= killed:
                touched[no].append(killed)
                on_dead_worker.add(no)
        stranded, healthy = [], []
        for a in self.acked():
            times = list(touched.get(a.no, ()))
            # in flight when Redis was killed: messages published in the
            # last second may be gone with it (AOF everysec), and such a
            # message waits out the queue timeout
            redis_hit = [back for killed, back in self.redis_kills
                         if a.submitted_at < killed
                         and (a.final_at is None or a.final_at > killed)]
            times += redis_hit
            fetched = self.fetched_by_the_dead(a, activity.get(a.no, ()))
            times += fetched
            times += a.plan.touched
            # a fault after the saga was final did not touch it
            times = [t for t in times
                     if a.final_at is None or t <= a.final_at]
            if times:
                allowance = LEASE + SWEEP + 5.0
                if 'ignore' in a.plan.undo.values() or redis_hit \
                        or fetched:
                    allowance += QUEUE_TIMEOUT
                if 'retry_wait' in a.plan.fwd.values():
                    allowance += 4.0
                # from the last fault on, the saga must not sit still
                # longer than that (its remaining steps and undos may take
                # their time, running)
                last = max(times)
                marks = sorted([last] + [t for t in activity.get(a.no, ())
                                         if t > last]
                               + [a.final_at or time.time()])
                idle = max(b - c for c, b in zip(marks, marks[1:]))
                if a.final_at is None or idle > allowance:
                    stranded.append((a, 'stranded'))
            if (a.state in ('COMPENSATED', 'COMPENSATION_FAILED')
                    and set(a.plan.faults) <= set(HEALTHY)
                    and a.no not in on_dead_worker and not redis_hit
                    and not fetched):
                healthy.append((a, 'healthy-compensated'))
        return stranded, healthy

    def fetched_by_the_dead(self, a: Attempt, activity: Any) -> list[float]:
        """The whole-worker deaths (wall times) that may have left saga
        ``a`` a message fetched by the dead worker's broker client and
        never received by Celery: the saga sat idle across the death, and
        resumed when the visibility timeout restored that message, or when
        its queue lease (counted from before the death) sent it again."""
        deaths = [d for d in self.worker_deaths if a.submitted_at < d + 1.0
                  and (a.final_at is None or a.final_at > d)]
        if not deaths:
            return []
        marks = sorted([a.submitted_at, *activity])
        gaps = [(c, b) for c, b in zip(marks, marks[1:]) if b - c > LEASE]
        return [d for d in deaths if any(
            c <= d + 1.0 <= b + 1.0 and b <= max(
                d + RESTORED_WITHIN, c + QUEUE_TIMEOUT + SWEEP + 3.0)
            for c, b in gaps)]

    def details(self, problems: list[dict[str, Any]], records: dict[str, Any],
                per: dict[int, dict[int, StepLog]],
                stuck: list[Attempt]) -> None:
        shown = 0
        items = [(p['kind'], p['saga'], p['no'], p.get('step'), p['detail'])
                 for p in problems]
        items += [('not-final', a.sid, a.no, None, f'state {a.state}')
                  for a in stuck]
        print(f'--- {len(problems)} problems, {len(stuck)} sagas not final; '
              'the first ones:', flush=True)
        seen: set[str] = set()
        for n, (kind, sid, no, step, detail) in enumerate(items):
            if n == 40:
                print(f'... and {len(items) - n} more')
                break
            print(f'problem: {kind}: saga {sid} (no {no}) step {step}: '
                  f'{detail}')
            if sid in seen:
                continue
            seen.add(sid)
            shown += 1
            if shown > self.args.details:
                continue
            att = self.attempts[no]
            print(f'  plan: stages {att.plan.stages} fwd {att.plan.fwd} undo '
                  f'{att.plan.undo} revoke {att.plan.revoke} abort '
                  f'{att.plan.abort} aborted {att.aborted}')
            rec = records.get(sid)
            if rec is None:
                print('  record: none')
            else:
                print(f'  record: {rec.state.value} failed_step '
                      f'{rec.failed_step} reason {rec.reason!r}')
                for s in rec.steps:
                    print(f'    step {s.index} stage {s.stage}: '
                          f'{s.state.name}, undo {s.undo_state.name} '
                          f'attempts {s.undo_attempts} failure '
                          f'{(s.failure or "")[:80]!r} undo_error '
                          f'{(s.undo_error or "")[:80]!r}')
            entries = sorted(e for lg in per.get(no, {}).values()
                             for e in lg.entries)
            print('  ledger:')
            for pos, kind2, d in entries[:40]:
                print(f'    #{pos} {kind2} step {d["i"]} {d["t"]} pid '
                      f'{d["pid"]}{" redelivered" if d.get("rd") else ""}'
                      f'{" " + d["f"] if d.get("f") else ""}')
            print('  worker log:')
            lines = [line for w in self.workers for line in w.lines_with(sid)]
            for line in sorted(lines, key=lambda line: line[4:])[:40]:
                print(f'    {line[:300]}')
        print('---', flush=True)

    def close(self) -> None:
        """Stop everything started here (a second Ctrl-C: kill it)."""
        for w in self.workers:
            try:
                w.stop()
            except BaseException:  # noqa: BLE001
                w.kill()
        if self.app is not None:
            try:
                self.app.close()
            except Exception as exc:  # noqa: BLE001
                print(f'chaos: closing the app: {exc!r}', file=sys.stderr)
        if self.redis is not None:
            try:
                self.redis.stop()
            except BaseException:  # noqa: BLE001
                self.redis.kill()
        if self.args.keep:
            print(f'kept {self.tmp} (worker logs, Redis AOF)', flush=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m tests.tools.chaos',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--sagas', type=int, default=300)
    p.add_argument('--seed', type=int, default=None,
                   help='random seed (default: a new one, printed)')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--faults', default='all',
                   help='comma list of ' + ','.join(ALL_FAULTS) +
                   ' (default: all); prefix with - to drop from all, e.g. '
                   '"-kill_worker,-kill_redis"')
    p.add_argument('--json', default=None, help='write the results here')
    p.add_argument('--wide', type=int, default=200,
                   help='add one saga with a parallel stage this wide (0: '
                        'none)')
    p.add_argument('--duration', type=float, default=None,
                   help='seconds over which sagas are submitted '
                   '(default: max(12, 0.3 * sagas))')
    p.add_argument('--timeout', type=float, default=None,
                   help='seconds after the last wave to wait for every saga '
                   'to be final (default: min(300, 30 + sagas))')
    p.add_argument('--details', type=int, default=8,
                   help='sagas whose problems are shown in full')
    p.add_argument('--keep', action='store_true',
                   help='keep the temp dir (worker logs, AOF)')
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    args.faults = parse_faults(args.faults, p)
    if args.sagas < 1 or args.workers < 1:
        p.error('--sagas and --workers must be >= 1')
    return args


def parse_faults(text: str, p: argparse.ArgumentParser | None = None
                 ) -> list[str]:
    items = [x.strip() for x in text.split(',') if x.strip()]
    if items in (['all'], []):
        return list(ALL_FAULTS)
    if items == ['none']:
        return []
    if all(x.startswith('-') for x in items):
        chosen = [k for k in ALL_FAULTS if f'-{k}' not in items]
        items = [x[1:] for x in items]
    else:
        chosen = items
    unknown = [x for x in items if x not in ALL_FAULTS]
    if unknown:
        msg = f'unknown fault kinds {unknown}; known: {", ".join(ALL_FAULTS)}'
        if p:
            p.error(msg)
        raise ValueError(msg)
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format='%(asctime)s %(name)s %(levelname)s %(message)s')
    # Ctrl-C and SIGTERM (a CI timeout) stop everything started here; also
    # when started from a script in the background (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    driver = Driver(args)
    try:
        return driver.run()
    except SetupError as exc:
        print(f'chaos: cannot run: {exc}', file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print('chaos: interrupted', file=sys.stderr, flush=True)
        return 130
    except Terminated:
        print('chaos: terminated', file=sys.stderr, flush=True)
        return 143
    finally:
        driver.close()


class Terminated(Exception):
    """SIGTERM."""


def _terminate(*_: Any) -> None:
    raise Terminated()


if __name__ == '__main__':
    sys.exit(main())
