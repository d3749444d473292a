"""``make bench``: what a saga costs next to the plain Celery chain it
protects, measured against one real ``redis-server`` and one real prefork
worker (concurrency 2).  A benchmark, not a test: it prints its figures (a
Markdown table, targets marked PASS/FAIL) and writes them as JSON.

    python -m tests.tools.bench [--chains 500] [--steps 5] [--rounds 3] ...

Phases:

1. throughput: N sagas of K trivial steps vs N plain chains of the same
   tasks, alternated ``--rounds`` times (who goes first alternates too);
   the median of the per-round ratios saga/plain.  Each run also gives
   ``INFO commandstats`` deltas (Redis commands per task and per step; the
   library's round trips are its ``EVALSHA`` calls) and the worker's CPU.
2. failure to first undo: the time between a step's failure being recorded
   and its saga's first undo starting (both written by the worker), over
   many failing sagas: with an idle worker, then while ``--backlog``
   forward sagas are queued, with undos on their own queue
   (``compensate_undo_queue``) and, for contrast, on the forward queue.
3. memory per in-flight and per finished saga (``used_memory`` deltas over
   sagas recorded directly through the store), and the key count once
   finished sagas expired and a sweep trimmed the listing index.
4. one recovery sweep with ``--stored`` sagas stored and 100 due, against
   the same sweep with 1,000 stored: it must not grow with the store.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import redis

from celery_compensate.store import shard_of
from celery_compensate.testing import WorkerProcess, redis_server
from celery_compensate.store import layout as L

ROOT = Path(__file__).resolve().parents[2]
TICK = os.sysconf('SC_CLK_TCK')


# -- measuring --------------------------------------------------------------

def commandstats(rds: redis.Redis) -> dict[str, int]:
    """Calls per command (script-internal calls included)."""
    return {name[len('cmdstat_'):]: int(stat['calls'])
            for name, stat in rds.info('commandstats').items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()
            if v != before.get(k, 0)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its descendants."""
    stats = {}
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]),
                                      int(fields[11]) + int(fields[12]))
    family, total = {pid}, 0
    grew = True
    while grew:
        grew = False
        for child, (ppid, _) in stats.items():
            if ppid in family and child not in family:
                family.add(child)
                grew = True
    for member in family:
        total += stats.get(member, (0, 0))[1]
    return total / TICK


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def wait_until(predicate: Callable[[], bool], timeout: float,
               what: str, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f'bench: {what} did not happen in {timeout}s')
        time.sleep(interval)


# -- the bench ----------------------------------------------------------------

class Bench:
    """One Redis, the bench app, and its worker (restarted per routing)."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url, self.args = url, args
        self.rds = redis.Redis.from_url(url, decode_responses=True)
        os.environ['COMPENSATE_BENCH_BROKER'] = url
        from celery import chain

        from celery_compensate import saga
        from celery_compensate.appstate import get_state

        from . import bench_app
        self.chain, self.saga, self.bench_app = chain, saga, bench_app
        self.state = get_state(bench_app.app)
        self.worker: WorkerProcess | None = None

    def start_worker(self, undo_queue: str | None) -> None:
        """The worker, with undos on their own queue or not.  With one, it
        also takes one message per process at a time
        (``--prefetch-multiplier 1``): an undo then waits behind at most
        two prefetched forward tasks, not eight."""
        self.stop_worker()
        queues = ['bench', 'bench-fail'] + ([undo_queue] if undo_queue else [])
        env = {'COMPENSATE_BENCH_BROKER': self.url,
               'COMPENSATE_BENCH_UNDO_QUEUE': undo_queue or '',
               'COMPENSATE_BENCH_NO_RECEIPTS':
                   os.environ.get('COMPENSATE_BENCH_NO_RECEIPTS', '')}
        extra = ['--prefetch-multiplier', '1'] if undo_queue else []
        self.worker = WorkerProcess(
            'tests.tools.bench_app', env, '-P', 'prefork', '-c', '2',
            '-Q', ','.join(queues), *extra, name='bench', cwd=ROOT)
        self.worker.start()
        self.run('saga', 20)            # warm: imports, scripts, connections
        self.run('plain', 20)

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def signatures(self, counter: str) -> list[Any]:
        app = self.bench_app
        return [app.step.s(0), *(app.step.s() for _ in range(self.args.steps
                                                             - 2)),
                app.last.s(counter)]

    def run(self, kind: str, n: int) -> dict[str, Any]:
        """Start ``n`` chains or sagas at once; wait until all finished."""
        counter = f'bench:done:{uuid.uuid4().hex}'
        assert self.worker is not None and self.worker.proc is not None
        cpu0, stats0 = cpu_seconds(self.worker.proc.pid), commandstats(self.rds)
        start = time.perf_counter()
        for _ in range(n):
            sigs = self.signatures(counter)
            if kind == 'plain':
                self.chain(*sigs).apply_async()
            else:
                self.saga(*sigs).apply_async()
        wait_until(lambda: int(self.rds.get(counter) or 0) >= n, 600,
                   f'{n} {kind} runs finishing')
        took = time.perf_counter() - start
        # a saga's last step is recorded just after its body counted it:
        # its commands belong to this run, not the next
        wait_until(lambda: not self.unfinished(), 60, 'the sagas finishing')
        cpu = cpu_seconds(self.worker.proc.pid) - cpu0
        stats = delta(commandstats(self.rds), stats0)
        self.rds.delete(counter)
        return {'kind': kind, 'n': n, 'seconds': took, 'per_second': n / took,
                'worker_cpu_ms_per_task': 1000 * cpu / (n * self.args.steps),
                'commands': stats}

    def unfinished(self) -> int:
        """Sagas of the bench app not finished yet (its ``:live`` index)."""
        store = self.state.store
        pipe = self.rds.pipeline(transaction=False)
        for shard in range(64):
            pipe.zcard(store.keys.live(shard))
        return sum(pipe.execute())

    # -- phases ---------------------------------------------------------------

    def throughput(self) -> dict[str, Any]:
        runs: list[dict[str, Any]] = []
        ratios = []
        for r in range(self.args.rounds):
            pair = {}
            for kind in (('plain', 'saga') if r % 2 == 0 else ('saga', 'plain')):
                pair[kind] = self.run(kind, self.args.chains)
                runs.append(pair[kind])
                print(f'  round {r + 1} {kind:5}: {pair[kind]["per_second"]:7.1f}'
                      f'/s, worker CPU {pair[kind]["worker_cpu_ms_per_task"]:.2f}'
                      ' ms per task', flush=True)
            ratios.append(pair['saga']['per_second'] / pair['plain']['per_second'])
        n, k = self.args.chains, self.args.steps

        def per(kind: str, command: str | None = None) -> float:
            mine = [x for x in runs if x['kind'] == kind]
            total = [sum(v for c, v in x['commands'].items()
                         if command is None or c == command) for x in mine]
            return statistics.median(total)

        saga_extra = per('saga') - per('plain')
        evalsha = per('saga', 'evalsha')
        return {
            'runs': runs, 'ratios': ratios,
            'ratio_median': statistics.median(ratios),
            'plain_per_second': statistics.median(
                x['per_second'] for x in runs if x['kind'] == 'plain'),
            'saga_per_second': statistics.median(
                x['per_second'] for x in runs if x['kind'] == 'saga'),
            'plain_cpu_ms_per_task': statistics.median(
                x['worker_cpu_ms_per_task'] for x in runs
                if x['kind'] == 'plain'),
            'saga_cpu_ms_per_task': statistics.median(
                x['worker_cpu_ms_per_task'] for x in runs
                if x['kind'] == 'saga'),
            'celery_commands_per_task': per('plain') / (n * k),
            'saga_extra_commands_per_step': saga_extra / (n * k),
            'saga_extra_commands_per_saga': saga_extra / n,
            # every call of the library is one EVALSHA: START per saga,
            # then STEP_DONE per step (plus a lease renewal or sweep now and
            # then, counted in here too)
            'round_trips_per_saga': evalsha / n,
            'round_trips_per_step': (evalsha - n) / (n * k),
        }

    def by_command(self, n: int = 50) -> dict[str, Any]:
        """Run ``n`` sagas under ``MONITOR`` and count each library command
        (``EVALSHA`` mapped to its ``lua/<command>.lua`` by SHA1): which
        round trips the pool child pays per step (STEP_DONE), which the
        worker's main process pays (RECEIVE when its consumer takes a
        message; CONFIRM/RELEASE/RENEW ride in one pipeline per
        heartbeat), and START per saga in the caller."""
        names = {sha: source.name
                 for sha, source in self.state.store.sources.items()}
        counts: dict[str, int] = {}
        monitor_client = redis.Redis.from_url(self.url)
        stop = False

        def watch() -> None:
            with monitor_client.monitor() as m:
                for event in m.listen():
                    if stop:
                        return
                    parts = event['command'].split(' ')
                    if parts[0].upper() == 'EVALSHA' and len(parts) > 1:
                        name = names.get(parts[1], 'other')
                        counts[name] = counts.get(name, 0) + 1

        import threading
        # the heartbeat that confirms the earlier phases' last steps first
        time.sleep(self.state.settings.heartbeat_interval + 0.5)
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        time.sleep(0.5)
        self.run('saga', n)
        # the heartbeat after the last saga confirms its last steps
        time.sleep(self.state.settings.heartbeat_interval + 1.0)
        stop = True
        self.rds.ping()                 # one more event ends listen()
        thread.join(5)
        steps = n * self.args.steps
        return {'n': n, 'steps': steps, 'counts': dict(counts),
                'per_step': {k: v / steps for k, v in counts.items()}}

    def failing(self, queue: str | None = None) -> Any:
        app = self.bench_app
        first = app.step.s(0)
        last = app.fail.s()
        if queue:
            first, last = first.set(queue=queue), last.set(queue=queue)
        return self.saga(first, last).apply_async()

    def latency(self, res: Any) -> float:
        rec = self.state.store.read(res.id)
        return rec.steps[0].undo_started_at - rec.steps[1].settled_at

    def latency_idle(self) -> list[float]:
        out = []
        for _ in range(self.args.failures):
            res = self.failing()
            # polled slowly: the latency is read from the record's times
            wait_until(lambda res=res: res.state.value == 'COMPENSATED', 30,
                       'a failing saga compensating', 0.01)
            out.append(self.latency(res))
        return out

    def celery_floor(self) -> list[float]:
        """Celery's own time from publishing a task to its start on the
        idle worker: an undo cannot start sooner after a failure."""
        out = []
        for _ in range(self.args.failures):
            key = f'bench:stamp:{uuid.uuid4().hex}'
            sent = time.time()
            self.bench_app.stamp.delay(key)
            wait_until(lambda key=key: self.rds.exists(key), 30,
                       'a task starting', 0.01)
            out.append(float(self.rds.get(key)) - sent)
            self.rds.delete(key)
        return out

    def latency_loaded(self) -> tuple[list[float], int]:
        """Queue ``backlog`` forward sagas, then fail sagas whose steps go
        to a queue of their own, so each failure happens while the backlog
        waits; returns the latencies and the backlog left at the end."""
        counter = f'bench:done:{uuid.uuid4().hex}'
        for _ in range(self.args.backlog):
            self.saga(*self.signatures(counter)).apply_async()
        failing = [self.failing('bench-fail')
                   for _ in range(self.args.loaded_failures)]
        for res in failing:
            wait_until(lambda res=res: res.state.value == 'COMPENSATED', 600,
                       'a failing saga compensating under load', 0.005)
        left = self.rds.llen('bench')
        wait_until(lambda: int(self.rds.get(counter) or 0)
                   >= self.args.backlog, 600, 'the backlog draining', 0.01)
        self.rds.delete(counter)
        return [self.latency(r) for r in failing], left

    def memory(self) -> dict[str, Any]:
        """Records written through the store directly (no broker traffic
        in the deltas), then finished, then expired and trimmed."""
        from celery_compensate.model import Plan, TaskRef, UndoSpec
        from celery_compensate.settings import Settings
        from celery_compensate.store import SagaStore
        ttl = 30     # well above the time to write them all (checked)
        settings = Settings.from_conf({
            'compensate_redis_url': self.url, 'compensate_key_prefix': 'mem',
            'compensate_result_expires': ttl})
        store = SagaStore(settings)
        plan = Plan.from_stages([[(TaskRef('bench.step', (0,)),
                                   UndoSpec('bench.undo'), False)]]
                                + [[(TaskRef('bench.step'),
                                     UndoSpec('bench.undo'), False)]]
                                * (self.args.steps - 1))
        n = self.args.memory_sagas

        def keys() -> int:
            return sum(1 for _ in self.rds.scan_iter('mem:*', count=1000))

        baseline_keys = keys()
        base = self.rds.info('memory')['used_memory']
        ids = [f'mem-{i}' for i in range(n)]
        for sid in ids:
            store.create(sid, plan)
        inflight = (self.rds.info('memory')['used_memory'] - base) / n
        for sid in ids:
            for i in range(self.args.steps):
                store.step_done(sid, i, str(i + 1))
        finished = (self.rds.info('memory')['used_memory'] - base) / n
        peak_keys = keys()
        alive = sum(self.rds.exists(store.keys.saga(sid)) for sid in ids)
        if alive != n:
            raise SystemExit(f'bench: {n - alive} finished sagas expired '
                             'before their memory was read; lower '
                             '--memory-sagas')

        def trimmed() -> bool:
            # sweeps trim the listing index once the records expired
            store.due(100, 1.0, 0.0)
            return not any(not k.endswith(':sweep') for k in
                           self.rds.scan_iter('mem:*', count=1000))

        wait_until(trimmed, ttl + 60, 'the records expiring', 0.5)
        # the sweeps' own per-shard records expire 3 s after the last one
        wait_until(lambda: keys() == baseline_keys, 30,
                   'the key count returning to baseline', 0.2)
        store.client.close()
        return {'sagas': n, 'bytes_per_inflight_saga': inflight,
                'bytes_per_finished_saga': finished,
                'keys_baseline': baseline_keys, 'keys_peak': peak_keys,
                'keys_after_expiry': keys()}

    def wide(self, width: int) -> dict[str, Any]:
        """One saga whose middle stage has ``width`` members, through the
        store directly: every member event's Redis time (``EVALSHA`` usec
        per call, from ``INFO commandstats``), once completing the saga
        and once compensating it (the last member fails)."""
        from celery_compensate.model import Plan, TaskRef, UndoSpec
        from celery_compensate.settings import Settings
        from celery_compensate.store import SagaStore
        settings = Settings.from_conf({
            'compensate_redis_url': self.url,
            'compensate_key_prefix': f'wide{width}'})
        store = SagaStore(settings)
        member = (TaskRef('bench.step'), UndoSpec('bench.undo'), False)
        plan = Plan.from_stages([[(TaskRef('bench.step', (0,)),
                                   UndoSpec('bench.undo'), False)],
                                 [member] * width, [member]])
        costs: dict[str, list[float]] = {}

        def timed(kind: str, calls: Callable[[], Any]) -> None:
            before = self.rds.info('commandstats').get('cmdstat_evalsha', {})
            calls()
            after = self.rds.info('commandstats')['cmdstat_evalsha']
            n = after['calls'] - before.get('calls', 0)
            usec = after['usec'] - before.get('usec', 0)
            costs.setdefault(kind, []).append(usec / max(1, n))

        took = {}
        for sid, fail in ((f'ok{width}', False), (f'bad{width}', True)):
            start = time.perf_counter()
            store.create(sid, plan)
            store.step_done(sid, 0, '"r0"')
            members = range(1, width + 1)
            timed('receive', lambda: [store.receive(sid, i, None, 1, 'w')
                                      for i in members])
            timed('renew', lambda: store.renew(
                [(sid, i, None, 'w') for i in members]))
            last = width if fail else width + 1
            timed('step_done', lambda: [store.step_done(sid, i, '"r"')
                                        for i in range(1, last)])
            if fail:
                timed('claim',
                      lambda: store.step_failed(sid, width, 'boom'))
                timed('undo_begin', lambda: [
                    store.undo_begin(sid, i, 1, f'b{i}')
                    for i in range(1, width)])
                timed('undo_done', lambda: [store.undo_done(sid, i)
                                            for i in range(1, width)])
                store.undo_begin(sid, 0, 1, 'b0')
                store.undo_done(sid, 0)
            else:
                store.step_done(sid, width + 1, '"r"')
            state = store.get_state(sid).value
            took[sid] = {'state': state,
                         'seconds': time.perf_counter() - start}
        self.rds.delete(*[k for k in self.rds.scan_iter(f'wide{width}:*',
                                                        count=1000)])
        per_event = {k: statistics.mean(v) for k, v in costs.items()}
        # the claim opens the whole stage once: per member of the stage
        per_event['claim, per member'] = per_event.pop('claim') / width
        return {'width': width, 'usec_per_event': per_event, 'sagas': took}

    def wide_median(self, width: int, runs: int = 3) -> dict[str, Any]:
        """:meth:`wide` ``runs`` times: the median time per event, the
        last run's sagas."""
        results = [self.wide(width) for _ in range(runs)]
        kinds = results[0]['usec_per_event']
        return {'width': width, 'runs': runs, 'usec_per_event': {
            k: statistics.median(r['usec_per_event'][k] for r in results)
            for k in kinds}, 'sagas': results[-1]['sagas']}

    def sweep(self, stored: int, due: int = 100) -> dict[str, Any]:
        """One sweep with ``stored`` sagas stored, ``due`` of them lapsed."""
        from celery_compensate.model import Plan, TaskRef, UndoSpec
        from celery_compensate.recovery import Recovery
        from celery_compensate.settings import Settings
        prefix = f'sweep{stored}'
        settings = Settings.from_conf({
            'compensate_redis_url': self.url, 'compensate_key_prefix': prefix})
        rec = Recovery(self.bench_app.app, settings)
        rec.gap, rec.hold = 3600.0, 0.0     # no gap to wait out here
        store = rec.store
        plan = Plan.from_stages([[(TaskRef('bench.step', (0,)),
                                   UndoSpec('bench.undo'), False)]])
        fill = time.perf_counter()
        for i in range(stored):
            store.create(f's{i}', plan)
        fill = time.perf_counter() - fill
        lapsed = [f's{i}' for i in range(0, stored, stored // due)][:due]
        pipe = self.rds.pipeline(transaction=False)
        for sid in lapsed:
            pipe.hset(store.keys.saga(sid), L.deadline(0), 0)
            pipe.zadd(store.keys.due(shard_of(sid)), {sid: 0})
        pipe.execute()
        stats0 = self.rds.info('commandstats')
        start = time.perf_counter()
        acted = rec.sweep()
        took = time.perf_counter() - start
        stats1 = self.rds.info('commandstats')
        calls = sum(s['calls'] for s in stats1.values()) - sum(
            s['calls'] for s in stats0.values())
        usec = sum(s['usec'] for s in stats1.values()) - sum(
            s['usec'] for s in stats0.values())
        assert acted == due, (acted, due)
        for key in self.rds.scan_iter(f'{prefix}:*', count=5000):
            self.rds.unlink(key)
        return {'stored': stored, 'due': due, 'fill_seconds': fill,
                'sweep_ms': 1000 * took, 'redis_commands': calls,
                'redis_usec': usec}


# -- report -------------------------------------------------------------------

def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    t, lat = r['throughput'], r['latency']
    small, big = r['sweep']
    child = r['by_command']['per_step'].get('step_done', 0.0)
    ws, wb = (w['usec_per_event'] for w in r['wide'])
    # member events; the claim opens a whole stage once (shown, not a
    # member event)
    wide_pairs = {k: (ws[k], wb[k]) for k in ws if not k.startswith('claim')}
    flat = big['redis_commands'] <= small['redis_commands'] * 1.05 and \
        big['sweep_ms'] <= max(2 * small['sweep_ms'], small['sweep_ms'] + 20)
    return [
        ('saga throughput / plain chains', '>= 0.90 (ceiling ~0.93)',
         f"{t['ratio_median']:.3f}", t['ratio_median'] >= 0.90),
        ('round trips per successful step in the pool child (STEP_DONE)',
         '1', f"{child:.3f}", child <= 1.05),
        ('failure to first undo p99, idle worker', '<= 5 ms',
         f"{lat['idle']['p99_ms']:.2f} ms", lat['idle']['p99_ms'] <= 5),
        (f"failure to first undo p99, {r['args']['backlog']} sagas queued, "
         'undos on their own queue', '<= 50 ms',
         f"{lat['loaded_undo_queue']['p99_ms']:.2f} ms",
         lat['loaded_undo_queue']['p99_ms'] <= 50),
        ('keys after the TTL', 'back to baseline',
         f"{r['memory']['keys_after_expiry']} (baseline "
         f"{r['memory']['keys_baseline']})",
         r['memory']['keys_after_expiry'] == r['memory']['keys_baseline']),
        ('script time per member event, W=5,000 vs W=100',
         'flat within 2x', ', '.join(
             f"{k} {wb:.0f}/{ws:.0f} us" for k, (ws, wb) in wide_pairs.items()),
         all(wb <= 2 * max(ws, 5.0) for ws, wb in wide_pairs.values())),
        ('claim of a wide stage, per member, W=5,000 vs W=100', 'shown',
         f"{wb['claim, per member']:.0f} vs {ws['claim, per member']:.0f} us",
         True),
        ('a 5,000-member saga completes / compensates', 'yes', ', '.join(
            f"{v['state']} in {v['seconds']:.1f}s"
            for v in r['wide'][1]['sagas'].values()),
         [v['state'] for v in r['wide'][1]['sagas'].values()]
         == ['COMPLETED', 'COMPENSATED']),
        (f"sweep cost, {big['stored']:,} vs {small['stored']:,} stored "
         '(100 due)', 'flat',
         f"{big['sweep_ms']:.1f} vs {small['sweep_ms']:.1f} ms, "
         f"{big['redis_commands']} vs {small['redis_commands']} commands",
         flat),
    ]


def summary(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values]
    return {'n': len(ms), 'p50_ms': percentile(ms, 0.50),
            'p95_ms': percentile(ms, 0.95), 'p99_ms': percentile(ms, 0.99),
            'max_ms': max(ms)}


def markdown(r: dict[str, Any]) -> str:
    t, lat, mem = r['throughput'], r['latency'], r['memory']
    a = r['args']
    lines = [
        f"### {a['chains']} sagas / chains of {a['steps']} trivial steps, "
        f"prefork -c 2, {a['rounds']} rounds",
        '', '| measure | value |', '|---|---|',
        f"| plain chains per second (median) | {t['plain_per_second']:.1f} |",
        f"| sagas per second (median) | {t['saga_per_second']:.1f} |",
        f"| ratio saga / plain per round | "
        f"{', '.join(f'{x:.3f}' for x in t['ratios'])} |",
        f"| worker CPU per task, plain / saga | "
        f"{t['plain_cpu_ms_per_task']:.2f} / {t['saga_cpu_ms_per_task']:.2f} ms |",
        f"| Redis commands per task, plain chain (Celery's own) | "
        f"{t['celery_commands_per_task']:.1f} |",
        f"| extra Redis commands per step / per saga (in scripts included) | "
        f"{t['saga_extra_commands_per_step']:.1f} / "
        f"{t['saga_extra_commands_per_saga']:.1f} |",
        f"| library EVALSHA per step / per saga, all processes | "
        f"{t['round_trips_per_step']:.3f} / {t['round_trips_per_saga']:.2f} |",
    ]
    bc = r['by_command']['per_step']
    lines.append(
        f"| per step, by command ({r['by_command']['n']} sagas under MONITOR):"
        f" pool child STEP_DONE {bc.get('step_done', 0):.3f}; worker main "
        f"process RECEIVE {bc.get('receive', 0):.3f} (one round trip each), "
        f"CONFIRM {bc.get('confirm', 0):.3f} + RELEASE "
        f"{bc.get('release', 0):.3f} + RENEW {bc.get('renew', 0):.3f} (in "
        "the heartbeat's one pipeline) |")
    for name, label in (('celery_floor', "Celery's own publish to start "
                         '(no saga), idle worker'),
                        ('idle', 'idle worker'),
                        ('loaded_undo_queue', f"{a['backlog']} sagas queued, "
                         'undos on their own queue'),
                        ('loaded_same_queue', f"{a['backlog']} sagas queued, "
                         'undos on the forward queue')):
        s = lat[name]
        what = '' if name == 'celery_floor' else 'failure to first undo, '
        lines.append(f"| {what}{label} (n={s['n']}): "
                     f"p50 / p95 / p99 | {s['p50_ms']:.2f} / {s['p95_ms']:.2f}"
                     f" / {s['p99_ms']:.2f} ms |")
    lines += [
        f"| Redis memory per in-flight / finished saga ({a['steps']} steps) | "
        f"{mem['bytes_per_inflight_saga']:.0f} / "
        f"{mem['bytes_per_finished_saga']:.0f} bytes |",
        f"| keys: baseline / peak / after TTL and a sweep | "
        f"{mem['keys_baseline']} / {mem['keys_peak']} / "
        f"{mem['keys_after_expiry']} |",
    ]
    for s in r['sweep']:
        lines.append(f"| one sweep, {s['stored']:,} stored, {s['due']} due | "
                     f"{s['sweep_ms']:.1f} ms, {s['redis_commands']} commands, "
                     f"{s['redis_usec']} µs in Redis |")
    lines += ['', '| target | wanted | measured | |', '|---|---|---|---|']
    lines += [f'| {n} | {w} | {m} | {"PASS" if ok else "FAIL"} |'
              for n, w, m, ok in targets(r)]
    return '\n'.join(lines)


def machine() -> dict[str, Any]:
    cpu = next((line.split(':', 1)[1].strip() for line in
                Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.processor())
    import celery
    import kombu
    return {'cpu': cpu, 'cores': os.cpu_count(),
            'python': platform.python_version(), 'celery': celery.__version__,
            'kombu': kombu.__version__, 'redis_py': redis.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m tests.tools.bench',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--chains', type=int, default=500)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--rounds', type=int, default=9)
    p.add_argument('--failures', type=int, default=300,
                   help='failing sagas timed one at a time (idle worker)')
    p.add_argument('--backlog', type=int, default=500)
    p.add_argument('--loaded-failures', type=int, default=100)
    p.add_argument('--memory-sagas', type=int, default=2000)
    p.add_argument('--stored', type=int, default=100_000)
    p.add_argument('--json', default='.bench/bench.json')
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error('--steps must be at least 2')
    result: dict[str, Any] = {'args': vars(args), 'machine': machine()}
    with redis_server(env_names=('COMPENSATE_BENCH_REDIS_URL',)) as url:
        bench = Bench(url, args)
        result['machine']['redis'] = bench.rds.info('server')['redis_version']
        try:
            print('throughput ...', flush=True)
            bench.start_worker(None)
            result['throughput'] = bench.throughput()
            print('round trips by command (MONITOR) ...', flush=True)
            result['by_command'] = bench.by_command()
            print('failure to first undo ...', flush=True)
            idle = bench.latency_idle()
            floor = bench.celery_floor()
            same, left_same = bench.latency_loaded()
            bench.start_worker('bench-undo')
            own, left_own = bench.latency_loaded()
            result['latency'] = {
                'idle': summary(idle), 'celery_floor': summary(floor),
                'loaded_undo_queue': {**summary(own), 'backlog_left': left_own},
                'loaded_same_queue': {**summary(same),
                                      'backlog_left': left_same}}
            bench.stop_worker()
            print('memory ...', flush=True)
            result['memory'] = bench.memory()
            print('sweep ...', flush=True)
            result['sweep'] = [bench.sweep(1000), bench.sweep(args.stored)]
            print('wide stages ...', flush=True)
            # three runs of each width, the median per event: one run's
            # microseconds move with the machine
            result['wide'] = [bench.wide_median(w) for w in (100, 5000)]
        finally:
            bench.stop_worker()
    out = markdown(result)
    print('\n' + out)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f'\nJSON: {path}')
    return 0 if all(ok for *_, ok in targets(result)) else 1


if __name__ == '__main__':
    sys.exit(main())
