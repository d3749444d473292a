"""The Celery app and tasks of the chaos suite (``tests/chaos.py``).

Loaded by the chaos worker subprocesses (``celery -A tests.tools.chaos_app
worker``) and by the chaos driver itself (which needs the same task names
to build sagas).  Configured from environment variables the driver sets:

- ``CHAOS_BROKER``: the Redis URL (broker, saga store and ledger);
- ``CHAOS_PREFIX``: ``compensate_key_prefix``; the ledger keys are
  ``<prefix>-chaos:*``;
- ``CHAOS_QUEUE``: the queue every task goes to;
- ``CHAOS_VISIBILITY``: the Redis transport's ``visibility_timeout``.

Effects are modelled like a real service reached with idempotency keys:

- the forward effect of step ``(saga_no, index)`` is applied at most once
  (``HSETNX`` on ``do:<saga_no>:<index>``), whatever the number of
  executions of the step;
- an undo applies its effect only if the forward effect exists and the
  undo's idempotency key (the one celery_compensate puts in the request
  headers) was not used yet, like a payment API refunding once per key.
  An undo re-run under another key (or none) would undo twice: every
  application increments ``undo:<saga_no>:<index>``, so a double undo is
  visible in the counts.

Every execution and every effect appends one entry to the ledger list
(``<kind> <json>``), the effect and its ledger entry in one Lua script so
the ledger order is the order of the effects.  Each write carries a token,
so a write resent after a lost reply (Redis killed) is applied once.
"""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.exceptions import Ignore

from celery_compensate import install
from celery_compensate.model import parse_task_id

BROKER = os.environ.get('CHAOS_BROKER', 'redis://127.0.0.1:6379/0')
PREFIX = os.environ.get('CHAOS_PREFIX', 'chaos')
QUEUE = os.environ.get('CHAOS_QUEUE', f'{PREFIX}-q')
VISIBILITY = float(os.environ.get('CHAOS_VISIBILITY', '20'))

#: ledger keys, shared with the driver
LEDGER = f'{PREFIX}-chaos:ledger'
EFFECTS = f'{PREFIX}-chaos:fx'
IDEM = f'{PREFIX}-chaos:idem'
REPLIES = f'{PREFIX}-chaos:replies'
DUPS = f'{PREFIX}-chaos:dup'

app = Celery('chaos', broker=BROKER, set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        'visibility_timeout': VISIBILITY,
        # look for unacked messages older than the visibility timeout
        # every 2 s instead of every ~100 s
        'unacked_restore_interval': 2,
        'unacked_restore_throttle': 1,
    },
    compensate_key_prefix=PREFIX,
    compensate_result_expires=7 * 86400,
    compensate_undo_retry_backoff=0.05,
    compensate_undo_retry_backoff_max=0.5,
    # flaky undos fail at most twice; two more attempts of slack for a lost
    # pool child or worker hitting an undo
    compensate_undo_max_attempts=5,
    # short leases so dead workers are noticed within seconds; a message
    # may wait 30 s in the broker (the run's backlog) before it is lost:
    # longer than the visibility timeout and its restore period, so a
    # message a killed worker had fetched comes back before it is given up
    compensate_step_timeout=3,
    compensate_queue_timeout=30,
    compensate_heartbeat_interval=0.5,
    compensate_recovery_interval=1,
)
install(app)


# -- the ledger ------------------------------------------------------------


def _lua(name: str) -> str:
    """A ledger script of ``tests/tools/lua`` (KEYS and ARGV in its header)."""
    return (Path(__file__).with_name('lua') / f'{name}.lua').read_text()


_DO, _UNDO, _NOTE = (_lua(name) for name in (
    'ledger_do', 'ledger_undo', 'ledger_note'))

_clients: dict[int, tuple[redis.Redis, Any, Any, Any]] = {}


def _client() -> tuple[redis.Redis, Any, Any, Any]:
    """One client per process (pool children are forked)."""
    pid = os.getpid()
    if pid not in _clients:
        r = redis.Redis.from_url(BROKER, decode_responses=True,
                                 socket_timeout=5, socket_connect_timeout=2)
        _clients[pid] = (r, r.register_script(_DO),
                         r.register_script(_UNDO), r.register_script(_NOTE))
    return _clients[pid]


def _retrying(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` until Redis answers (it is killed once per run): a
    client of a real service retries too.  Every call is safe to resend."""
    deadline = time.monotonic() + 60
    delay = 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _entry(task: Task, saga_no: int, index: int, **extra: Any) -> dict:
    req = task.request
    info = parse_task_id(req.id)
    return {'s': saga_no, 'i': index, 't': req.id,
            'a': info.attempt if info else None,
            'sid': getattr(req, 'compensate_saga_id', None),
            'rd': bool((req.delivery_info or {}).get('redelivered')),
            'pid': os.getpid(), 'ts': round(time.time(), 4), **extra}


def note(task: Task, kind: str, saga_no: int, index: int, **extra: Any) -> None:
    """Record an execution event (not an effect)."""
    _, _, _, script = _client()
    entry = f'{kind} {json.dumps(_entry(task, saga_no, index, **extra))}'
    _retrying(script, keys=[LEDGER, REPLIES], args=[uuid.uuid4().hex, entry])


def parse_fault(fault: str) -> tuple[str, bool, float | None, int]:
    """``kind[:fx][:<seconds>|:<n>]`` -> (kind, effect first, seconds, n).

    ``fx``: the forward (or undo) effect is applied before the fault hits.
    """
    kind, fx, secs, n = '', False, None, 0
    for k, part in enumerate((fault or '').split(':')):
        if k == 0:
            kind = part
        elif part == 'fx':
            fx = True
        elif part:
            if '.' in part:
                secs = float(part)
            else:
                n = int(part)
    return kind, fx, secs, n


class ChaosFailure(RuntimeError):
    """Raised on purpose."""


#: saga ids whose next forward publish from this process kills it (the
#: ``kill_publish`` fault: between recording a step and publishing the next
#: link; a pool child publishes inside the step's own call)
_KILL_ON_PUBLISH: set[str] = set()


@signals.before_task_publish.connect
def _kill_between_record_and_publish(headers: Any = None, **_: Any) -> None:
    headers = headers or {}
    sid = headers.get('compensate_saga_id')
    if sid in _KILL_ON_PUBLISH and not headers.get('compensate_attempt'):
        os.kill(os.getpid(), signal.SIGKILL)


def _compensate_headers(task: Task) -> dict[str, Any]:
    return {k: v for k, v in vars(task.request).items()
            if k.startswith('compensate_')}


def _once(key: str) -> bool:
    """True the first time ``key`` is asked for (across processes)."""
    return bool(_retrying(_client()[0].set, f'{DUPS}:{key}', 1, nx=True))


# -- the tasks -------------------------------------------------------------

@app.task(bind=True, name='chaos.undo')
def undo(self: Task, saga_no: int, index: int, fault: str = '') -> str:
    """The undo of ``chaos.step``; always safe when the forward effect never
    happened.  Faults: ``flaky:N`` fails on attempts <= N, ``kill:N`` kills
    its own pool child on attempts <= N, ``never`` always fails, ``slow``
    sleeps (so worker kills hit running undos); with ``:fx`` the effect is
    applied before the fault (an undo whose outcome is in doubt, repeated
    under the same idempotency key)."""
    kind, fx, secs, n = parse_fault(fault)
    idem = getattr(self.request, 'compensate_idempotency_key', None)
    attempt = getattr(parse_task_id(self.request.id), 'attempt', 0)
    note(self, 'undo-start', saga_no, index, idem=idem, f=fault)
    # an undo's own Celery controls: none is a failed attempt
    if kind == 'replace' and _once(f'replace:{saga_no}:{index}'):
        note(self, 'undo-replace', saga_no, index)
        raise self.replace(undo.si(saga_no, index, '').set(
            headers=_compensate_headers(self)))
    if kind == 'ignore' and _once(f'ignore:{saga_no}:{index}'):
        note(self, 'undo-ignore', saga_no, index)
        raise Ignore()
    if kind == 'retry0' and not self.request.retries:
        note(self, 'undo-retry', saga_no, index)
        raise self.retry(countdown=0, max_retries=3)
    hits = kind == 'never' or (kind in ('flaky', 'kill') and attempt <= n)

    def apply() -> str:
        _, _, script, _ = _client()
        entry = json.dumps(_entry(self, saga_no, index, idem=idem))
        return _retrying(script, keys=[EFFECTS, LEDGER, REPLIES, IDEM],
                         args=[uuid.uuid4().hex, f'{saga_no}:{index}',
                               idem or '', entry])

    if fx:
        apply()
    if kind == 'slow':
        time.sleep(secs or 1.0)
    if not fx and not hits:
        apply()
    if hits:
        if kind == 'kill':
            note(self, 'undo-kill', saga_no, index)
            os.kill(os.getpid(), signal.SIGKILL)
        note(self, 'undo-fail', saga_no, index)
        raise ChaosFailure(f'undo {saga_no}.{index} failed on purpose '
                           f'({fault}, attempt {attempt})')
    note(self, 'undo-end', saga_no, index)
    return f'undone {saga_no}.{index}'


@app.task(bind=True, name='chaos.step', compensate_with='chaos.undo',
          compensate_on_failure=True)
def step(self: Task, saga_no: int, index: int, fault: str = '') -> str:
    """A forward step.  Faults: ``fail`` raises, ``time_limit`` sleeps past
    its hard time limit, ``kill_child`` SIGKILLs its own pool child
    (``fail_once``, ``kill_once``: on its first run only, for steps past a
    pivot, which are retried),
    ``dup`` publishes a second copy of its own message, ``slow`` sleeps
    (so revokes and worker kills hit running steps); with ``:fx`` the
    effect is applied before the fault hits (an outcome in doubt)."""
    kind, fx, secs, _ = parse_fault(fault)
    note(self, 'start', saga_no, index, f=fault)
    if kind == 'kill_early' and _once(f'kill_early:{saga_no}:{index}'):
        # the whole worker, a moment after it received the step
        note(self, 'kill-worker', saga_no, index)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    if kind == 'retry_wait' and not self.request.retries:
        # back to the broker for longer than the step lease (3 s)
        note(self, 'retry', saga_no, index)
        raise self.retry(countdown=secs or 4.0, max_retries=1)
    if kind == 'kill_publish' and _once(f'kill_publish:{saga_no}:{index}'):
        note(self, 'kill-publish', saga_no, index)
        _KILL_ON_PUBLISH.add(self.request.compensate_saga_id)
    if kind == 'dup':
        r = _client()[0]
        if _retrying(r.set, f'{DUPS}:{saga_no}:{index}', 1, nx=True):
            headers = {k: v for k, v in vars(self.request).items()
                       if k.startswith('compensate_')}
            self.apply_async(args=self.request.args,
                             kwargs=self.request.kwargs,
                             task_id=self.request.id, headers=headers)
            note(self, 'dup-sent', saga_no, index)

    def apply() -> str:
        _, script, _, _ = _client()
        entry = json.dumps(_entry(self, saga_no, index))
        return _retrying(script, keys=[EFFECTS, LEDGER, REPLIES],
                         args=[uuid.uuid4().hex, f'{saga_no}:{index}', entry])

    if fx:
        apply()
    if kind == 'fail' or (kind == 'fail_once'
                          and _once(f'fail_once:{saga_no}:{index}')):
        note(self, 'fail', saga_no, index)
        raise ChaosFailure(f'step {saga_no}.{index} failed on purpose')
    if kind == 'time_limit':
        time.sleep(secs or 3.0)      # past its hard time limit
    elif kind == 'kill_child' or (kind == 'kill_once'
                                  and _once(f'kill_once:{saga_no}:{index}')):
        note(self, 'kill', saga_no, index)
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == 'slow':
        time.sleep(secs or 1.0)
    if not fx:
        apply()
    note(self, 'end', saga_no, index)
    if kind == 'unencodable':
        return object()       # the effect happened; the result cannot be stored
    return f'r{saga_no}.{index}'
