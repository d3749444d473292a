"""The app ``make bench`` runs: trivial steps, a trivial undo, a step that
fails, and the last link that counts finished chains.  Configured by
``COMPENSATE_BENCH_*`` environment variables so the benchmark process and
its worker subprocess agree."""
from __future__ import annotations

import logging
import os
from typing import Any

import redis
from celery import Celery, signals

from celery_compensate import install

BROKER = os.environ.get('COMPENSATE_BENCH_BROKER', 'redis://localhost:6379/0')

app = Celery('bench', broker=BROKER)
app.conf.update(
    task_default_queue='bench',
    compensate_key_prefix='bench',
    compensate_undo_queue=os.environ.get('COMPENSATE_BENCH_UNDO_QUEUE') or None,
    compensate_result_expires=float(
        os.environ.get('COMPENSATE_BENCH_EXPIRES', 3600)),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
install(app)
if os.environ.get('COMPENSATE_BENCH_NO_RECEIPTS'):
    # an A/B switch for measuring what the consumer's receipts cost
    from celery_compensate.bootsteps import CompensateReceive
    app.steps['consumer'].discard(CompensateReceive)

_done: list[redis.Redis] = []


@signals.after_setup_logger.connect
def _quiet(**_: Any) -> None:
    # no line per task: the bench measures Celery and the library, not
    # logging (the worker's "ready." line still shows)
    for name in ('celery.worker.strategy', 'celery.app.trace'):
        logging.getLogger(name).setLevel(logging.WARNING)


def _client() -> redis.Redis:
    if not _done:
        _done.append(redis.Redis.from_url(BROKER))
    return _done[0]


@app.task(name='bench.undo')
def undo(result: Any, *args: Any) -> None:
    """Undo of a trivial step: nothing to put back."""


@app.task(name='bench.step', compensate_with='bench.undo')
def step(x: int = 0) -> int:
    """A trivial step."""
    return x + 1


@app.task(name='bench.fail', compensate_with='bench.undo')
def fail(x: int = 0) -> int:
    """A step that always fails."""
    raise ValueError('failed on purpose')


@app.task(name='bench.stamp')
def stamp(key: str) -> None:
    """Record when it started (Celery's own publish-to-start latency)."""
    import time
    _client().set(key, repr(time.time()))


@app.task(name='bench.last')
def last(x: int, counter: str) -> int:
    """The last link of a chain or saga: counts it finished (both kinds
    pay this one INCR)."""
    _client().incr(counter)
    return x + 1
