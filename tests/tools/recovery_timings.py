"""Measure how long after a whole worker is SIGKILLed its saga reaches a
final state, for a few lease and sweep settings.

Run: ``.venv/bin/python -m tests.tools.recovery_timings [--runs N]``

Two prefork workers: the *victim* consumes the queue the hanging step is
routed to; the *survivor* consumes the default queue and sweeps.  The
victim is killed while the step runs; the time to ``COMPENSATED`` is
printed next to the lease (``compensate_step_timeout``) and the sweep
interval (``compensate_recovery_interval``).  A figure, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path

import redis
from celery import Celery

from celery_compensate import SagaState, install, saga
from celery_compensate.appstate import get_state
from celery_compensate.testing import WorkerProcess, delete_keys, redis_server
from celery_compensate.store import layout as L

from .. import tasks

ROOT = Path(__file__).resolve().parents[2]

#: (lease, heartbeat, sweep interval) in seconds
SETTINGS = [(2.0, 0.25, 0.5), (4.0, 0.5, 1.0), (8.0, 1.0, 2.0)]


def measure(url: str, lease: float, heartbeat: float, sweep: float,
            runs: int) -> list[float]:
    prefix = f'cctime-{uuid.uuid4().hex[:8]}'
    queue, hang_queue = f'{prefix}-q', f'{prefix}-hang'
    conf = {'compensate_key_prefix': prefix, 'task_default_queue': queue,
            'compensate_step_timeout': lease,
            'compensate_queue_timeout': 4 * lease,
            'compensate_heartbeat_interval': heartbeat,
            'compensate_recovery_interval': sweep}
    app = Celery('timings', broker=url, set_as_current=False)
    app.conf.update(conf)
    install(app)
    env = {'COMPENSATE_TEST_BROKER': url, 'COMPENSATE_TEST_PREFIX': prefix,
           'COMPENSATE_TEST_QUEUE': queue,
           'COMPENSATE_TEST_STEP_TIMEOUT': str(lease),
           'COMPENSATE_TEST_HEARTBEAT_INTERVAL': str(heartbeat),
           'COMPENSATE_TEST_RECOVERY_INTERVAL': str(sweep)}
    rds = redis.Redis.from_url(url, decode_responses=True)
    survivor = WorkerProcess('tests.prefork_app', env, '-P', 'prefork', '-c',
                             '2', '-Q', queue, name='survivor', cwd=ROOT)
    survivor.start()
    # the survivor holds the sweeper lock before the victim starts
    lock = f'{prefix}:sweeper'
    deadline = time.monotonic() + 30
    while not rds.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.02)
    figures = []
    try:
        for _ in range(runs):
            victim = WorkerProcess('tests.prefork_app', env, '-P', 'prefork',
                                   '-c', '1', '-Q', hang_queue, name='victim',
                                   cwd=ROOT).start()
            res = saga(tasks.do.si('a'),
                       tasks.do.si('b', sleep=600).set(queue=hang_queue),
                       app=app).apply_async()
            key = tasks.ledger_key(app, res.id)
            while 'start:b' not in rds.lrange(key, 0, -1):
                time.sleep(0.01)
            # the victim holds the step (its first renewal landed)
            record = get_state(app).store.keys.saga(res.id)
            while rds.hget(record, L.held(1)) != '1':
                time.sleep(0.01)
            victim.kill()
            killed = time.monotonic()
            while res.state is not SagaState.COMPENSATED:
                if time.monotonic() - killed > lease * 5 + 30:
                    raise RuntimeError(f'saga {res.id} not recovered')
                time.sleep(0.005)
            figures.append(time.monotonic() - killed)
            victim.stop()
    finally:
        survivor.stop()
        delete_keys(rds, f'{prefix}*')
        rds.close()
        app.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=5)
    args = parser.parse_args()
    print('| lease | heartbeat | sweep | kill → COMPENSATED, min / median / '
          'max (s) | bound lease + sweep |')
    print('|---|---|---|---|---|')
    with redis_server() as url:
        for lease, heartbeat, sweep in SETTINGS:
            f = measure(url, lease, heartbeat, sweep, args.runs)
            print(f'| {lease:g} s | {heartbeat:g} s | {sweep:g} s | '
                  f'{min(f):.2f} / {statistics.median(f):.2f} / '
                  f'{max(f):.2f} | {lease + sweep:g} s |', flush=True)


if __name__ == '__main__':
    main()
