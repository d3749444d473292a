"""Redis killed with ``kill -9`` and restarted from its append-only file
while sagas run: no acknowledged record is lost, the Lua scripts reload,
and the sagas in flight finish."""
from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery

from celery_compensate import (
    SagaResult, SagaState, StepState, install, saga,
)
from celery_compensate.testing import RedisProcess, WorkerProcess

from .. import tasks
from ..helpers import wait_for
from ..helpers import undone

pytestmark = pytest.mark.prefork
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not shutil.which('redis-server'),
                    reason='needs redis-server on PATH to kill and restart')
def test_sagas_in_flight_survive_a_redis_kill_and_restart():
    server = RedisProcess().start()
    prefix = f'cctest-rr-{uuid.uuid4().hex[:8]}'
    conf = dict(compensate_key_prefix=prefix, task_default_queue=f'{prefix}-q',
                compensate_step_timeout=3.0, compensate_queue_timeout=5.0,
                compensate_heartbeat_interval=0.25,
                compensate_recovery_interval=0.5)
    app = Celery('rr-producer', broker=server.url, set_as_current=False)
    app.conf.update(conf)
    install(app)
    worker = WorkerProcess('tests.prefork_app', {
        'COMPENSATE_TEST_BROKER': server.url,
        'COMPENSATE_TEST_PREFIX': prefix,
        'COMPENSATE_TEST_QUEUE': f'{prefix}-q',
        'COMPENSATE_TEST_STEP_TIMEOUT': '3',
        'COMPENSATE_TEST_HEARTBEAT_INTERVAL': '0.25',
        'COMPENSATE_TEST_RECOVERY_INTERVAL': '0.5',
    }, '-P', 'prefork', '-c', '2', '-Q', f'{prefix}-q', name='rr', cwd=ROOT)
    rds = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        worker.start()
        ok = [saga(tasks.do.si('a'), tasks.do.si('b', sleep=0.4),
                   tasks.do.si('c'), app=app).apply_async() for _ in range(4)]
        bad = [saga(tasks.do.si('a'), tasks.do.si('b', sleep=0.4),
                    tasks.do.si('c', fail=True), app=app).apply_async()
               for _ in range(4)]
        started = {r.id for r in ok + bad}
        wait_for(lambda: any('start:b' in rds.lrange(
            tasks.ledger_key(app, r.id), 0, -1) for r in ok + bad))
        server.kill()
        time.sleep(0.3)
        server.start()            # same port and directory: AOF reload
        # kombu 5.7 can crash the worker when the broker vanishes
        # ("Unrecoverable error: AttributeError ... 'hostname'", kombu
        # issues 582/970): restart it, as a process supervisor would
        def final(r: SagaResult) -> bool:
            if worker.proc.poll() is not None:
                worker.start()
            return r.ready()
        for r in ok + bad:
            wait_for(lambda r=r: final(r), timeout=60)
        names = ['a', 'b', 'c']
        for r in ok + bad:
            log = rds.lrange(tasks.ledger_key(app, r.id), 0, -1)
            done = [names[s.index] for s in r.steps
                    if s.state is StepState.DONE]
            if r.state is SagaState.COMPLETED:
                assert r in ok and undone(log) == []
                continue
            # a failure, or a step lost with the worker that crashed (its
            # prefetched message waits for the visibility timeout)
            assert r.state is SagaState.COMPENSATED, r.info()
            assert r in bad or r.info().reason.startswith('lost'), r.info()
            assert undone(log) == done[::-1], (log, r.info())
        # every saga acknowledged before the kill is still there
        assert {r.id for r in ok + bad
                if SagaResult(r.id, app=app).state} == started
    finally:
        worker.stop()
        rds.close()
        app.close()
        server.stop()
