"""Tasks the tests run through real workers.

Each writes what it did to a ledger list in Redis (``<prefix>:ledger:<saga>``)
so tests can count effects and check their order.  Behaviour is steered by
arguments and by Redis counters, never by process state.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from celery import Task, shared_task
from celery.exceptions import Ignore, Reject

from celery_compensate.appstate import get_state
from celery_compensate.store import layout as L

_clients: dict[str, redis.Redis] = {}


def client_for(app: Any) -> redis.Redis:
    # the ledger lives with the saga store, unless a test puts the store
    # in a Redis of its own to take it away
    url = (os.environ.get('COMPENSATE_TEST_LEDGER_URL')
           or get_state(app).settings.redis_url)
    if url not in _clients:
        # ride out a Redis restart, as a real service's client would
        _clients[url] = redis.Redis.from_url(
            url, decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 20),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    return _clients[url]


def ledger_key(app: Any, saga_id: str) -> str:
    return f'{get_state(app).settings.key_prefix}-t:ledger:{saga_id}'


def note(task: Task, entry: str) -> None:
    """Append to the ledger of the task's saga; a nested saga's tasks write
    to their outermost saga's, so one ledger orders the whole tree."""
    saga_id = getattr(task.request, 'compensate_saga_id', None) or 'none'
    saga_id = saga_id.partition('~')[0]
    client_for(task.app).rpush(ledger_key(task.app, saga_id), entry)


def kill_on_publish_key(prefix: str) -> str:
    """``<saga id>:<step>:<child|worker>``: the process that publishes that
    step (after recording the one before it; ``u<i>``: the undo of step i,
    after recording it due) is SIGKILLed first (see
    ``tests/prefork_app.py``)."""
    return f'{prefix}-t:kill-on-publish'


def hosts_key(app: Any, saga_id: str) -> str:
    return f'{get_state(app).settings.key_prefix}-t:hosts:{saga_id}'


def note_host(task: Task, name: str) -> None:
    """Note which worker runs this task, as ``<name> <task id> <hostname>``,
    in a list of its own (the ledger's entries stay as they are)."""
    saga_id = getattr(task.request, 'compensate_saga_id', None) or 'none'
    client_for(task.app).rpush(
        hosts_key(task.app, saga_id),
        f'{name} {task.request.id} {task.request.hostname}')


def countdown_key(app: Any, saga_id: str, name: str) -> str:
    return f'{get_state(app).settings.key_prefix}-t:failures:{saga_id}:{name}'


@shared_task(bind=True, name='t.undo')
def undo(self: Task, result: Any, name: str, *args: Any, **kwargs: Any) -> str:
    """Undo of ``t.do``: fails as often as its failure counter says."""
    r = client_for(self.app)
    saga_id = self.request.compensate_saga_id
    note(self, f'undo-start:{name}')
    note_host(self, name)
    r.hset(f'{get_state(self.app).settings.key_prefix}-t:idem:{saga_id}', name,
           str(getattr(self.request, 'compensate_idempotency_key', None)))
    if kwargs.get('undo_sleep'):
        time.sleep(kwargs['undo_sleep'])
    if kwargs.get('undo_hang_once') and r.set(
            countdown_key(self.app, saga_id, f'{name}-hung'), 1, nx=True):
        # noted only now: a test that stops this attempt on 'undo-start'
        # may stop it before the marker is set, and the next attempt hangs
        note(self, f'undo-hang:{name}')
        time.sleep(120)  # until the test kills the whole worker
    if kwargs.get('undo_kill_once') and r.set(
            countdown_key(self.app, saga_id, f'{name}-killed'), 1, nx=True):
        os.kill(os.getpid(), signal.SIGKILL)
    if r.decr(countdown_key(self.app, saga_id, name)) >= 0:
        note(self, f'undo-fail:{name}')
        raise RuntimeError(f'undo of {name} failed on purpose')
    note(self, f'undo:{name}:{result!r}')
    return f'undone {name}'


@shared_task(bind=True, name='t.do', compensate_with='t.undo')
def do(self: Task, name: str, fail: bool = False, sleep: float = 0.0,
       **kwargs: Any) -> str:
    """A step with an undo; may sleep, fail, or kill its own process."""
    note(self, f'start:{name}')
    note_host(self, name)
    if kwargs.get('kill_worker'):
        # the whole worker (its own process group), as an OOM kill would
        os.killpg(os.getpgid(0), signal.SIGKILL)
    if sleep and kwargs.get('ignore_term'):
        # a body that a revoke with terminate cannot stop
        before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            time.sleep(sleep)
        finally:
            signal.signal(signal.SIGTERM, before)
    elif sleep:
        time.sleep(sleep)
    if kwargs.get('kill'):
        os.kill(os.getpid(), signal.SIGKILL)
    if kwargs.get('reject'):
        raise Reject('rejected on purpose', requeue=False)
    if kwargs.get('ignore'):
        note(self, f'ignored:{name}')
        raise Ignore()
    if fail:
        note(self, f'fail:{name}')
        raise ValueError(f'{name} failed on purpose')
    note(self, f'do:{name}')
    return f'res-{name}'


@shared_task(name='t.narrow_undo')
def narrow_undo(result: Any) -> None:
    """An undo that takes the step's result only: it cannot undo a step
    that has arguments."""


@shared_task(bind=True, name='t.do_narrow', compensate_with='t.narrow_undo')
def do_narrow(self: Task, name: str) -> str:
    return f'res-{name}'


@shared_task(bind=True, name='t.chained', compensate_with='t.undo')
def chained(self: Task, prev: Any, name: str, fail: bool = False) -> Any:
    """A step that takes the previous step's result first, like a chain."""
    note(self, f'do:{name}:{prev!r}')
    if fail:
        raise ValueError(f'{name} failed on purpose')
    return f'res-{name}'


@shared_task(bind=True, name='t.plain')
def plain(self: Task, name: str, fail: bool = False) -> str:
    """A step without an undo."""
    note(self, f'do:{name}')
    if fail:
        raise ValueError(f'{name} failed on purpose')
    return f'res-{name}'


@shared_task(bind=True, name='t.self_undo', compensate_with='t.undo',
             compensate_on_failure=True)
def self_undo(self: Task, name: str, fail: bool = True) -> str:
    """A step whose undo also runs when it fails itself."""
    note(self, f'start:{name}')
    if fail:
        raise ValueError(f'{name} failed on purpose')
    return f'res-{name}'


@shared_task(bind=True, name='t.flaky', compensate_with='t.undo',
             max_retries=2, default_retry_delay=0)
def flaky(self: Task, name: str, times: int) -> str:
    """Fails ``times`` times, retrying through Celery, then succeeds."""
    note(self, f'try:{name}:{self.request.retries}')
    if self.request.retries < times:
        raise self.retry(countdown=0)
    note(self, f'do:{name}')
    return f'res-{name}'


@shared_task(bind=True, name='t.parked', compensate_with='t.undo')
def parked(self: Task, name: str, queue: str, sleep: float = 0.0) -> str:
    """Runs ``sleep`` seconds, then retries once into ``queue`` (where it
    waits until a worker consumes it), then succeeds."""
    note(self, f'try:{name}:{self.request.retries}')
    if not self.request.retries:
        time.sleep(sleep)
        raise self.retry(countdown=0, queue=queue, max_retries=1)
    note(self, f'do:{name}')
    return f'res-{name}'


@shared_task(bind=True, name='t.requeued', compensate_with='t.undo',
             acks_late=True)
def requeued(self: Task, name: str, sleep: float = 0.0) -> str:
    """Runs ``sleep`` seconds, then ``Reject(requeue=True)`` the first time
    (``acks_late``: the message goes back to the queue), then succeeds."""
    note(self, f'start:{name}')
    time.sleep(sleep)
    if client_for(self.app).set(countdown_key(
            self.app, self.request.compensate_saga_id, f'{name}-requeued'),
            1, nx=True):
        raise Reject('requeued on purpose', requeue=True)
    note(self, f'do:{name}')
    return f'res-{name}'


@shared_task(bind=True, name='t.limited', compensate_with='t.undo',
             rate_limit='40/m')
def limited(self: Task, name: str) -> str:
    """A rate-limited step: copies wait in the worker's token bucket."""
    note(self, f'do:{name}')
    return f'res-{name}'


@shared_task(bind=True, name='t.unserializable', compensate_with='t.undo')
def unserializable(self: Task, name: str) -> object:
    note(self, f'do:{name}')
    return object()


class KillAfterReturn(Task):
    """Dies after the body returned and the step was recorded: Celery logs
    "succeeded before the worker was lost" and signals nothing."""

    def on_success(self, retval: Any, task_id: str, args: Any,
                   kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


@shared_task(bind=True, name='t.dies_after', base=KillAfterReturn,
             compensate_with='t.undo')
def dies_after(self: Task, name: str) -> str:
    note(self, f'do:{name}')
    return f'res-{name}'


class AuditedTask(Task):
    """A user base class with its own ``__call__``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        note(self, 'audit')
        return super().__call__(*args, **kwargs)


@shared_task(bind=True, name='t.audited', base=AuditedTask,
             compensate_with='t.undo')
def audited(self: Task, name: str, fail: bool = False) -> str:
    note(self, f'do:{name}')
    if fail:
        raise ValueError(f'{name} failed on purpose')
    return f'res-{name}'


@shared_task(bind=True, name='t.release', )
def release(self: Task, *args: Any, **kwargs: Any) -> None:
    """An undo used as an immutable signature: records its exact args."""
    note(self, f'release:{list(args)!r}:{kwargs!r}')


class SlowSuccess(Task):
    """Keeps ``on_success`` busy, as any slow result backend or hook would."""

    def on_success(self, retval: Any, task_id: str, args: Any,
                   kwargs: Any) -> None:
        time.sleep(0.5)


@shared_task(bind=True, name='t.slow_success', base=SlowSuccess,
             compensate_with='t.undo')
def slow_success(self: Task, name: str) -> str:
    note(self, f'do:{name}')
    return f'res-{name}'


@shared_task(bind=True, name='t.check_prev', compensate_with='t.undo')
def check_prev(self: Task, name: str, prev_index: int, fail: bool = True) -> str:
    """Notes how the previous step is recorded at the moment this one runs."""
    saga_id = self.request.compensate_saga_id
    state = client_for(self.app).hget(
        get_state(self.app).store.keys.saga(saga_id), L.step_state(prev_index))
    note(self, f'prev-recorded:{state}')
    if fail:
        raise ValueError(f'{name} failed on purpose')
    return f'res-{name}'


class KillWholeWorker(Task):
    """Kills the whole worker (main process and pool) once, after the step
    was recorded but before its message was acknowledged (``acks_late``)."""

    def on_success(self, retval: Any, task_id: str, args: Any,
                   kwargs: Any) -> None:
        if client_for(self.app).set(
                countdown_key(self.app, task_id, 'worker-killed'), 1, nx=True):
            os.killpg(os.getpgid(0), signal.SIGKILL)


@shared_task(bind=True, name='t.kills_worker', base=KillWholeWorker,
             compensate_with='t.undo', acks_late=True)
def kills_worker(self: Task, name: str) -> str:
    note(self, f'do:{name}')
    return f'res-{name}'


@shared_task(bind=True, name='t.retrying_undo', max_retries=3,
             default_retry_delay=0)
def retrying_undo(self: Task, result: Any, name: str, *args: Any,
                  **kwargs: Any) -> None:
    """An undo that retries itself once through Celery before it succeeds."""
    note(self, f'undo-start:{name}:{self.request.retries}')
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    note(self, f'undo:{name}:{result!r}')


@shared_task(bind=True, name='t.replacing_undo')
def replacing_undo(self: Task, result: Any, name: str, *args: Any,
                   **kwargs: Any) -> None:
    """An undo that hands its work to ``t.undo`` with ``self.replace``."""
    note(self, f'replacing:{name}')
    saga_id = self.request.compensate_saga_id
    raise self.replace(undo.si(result, name).set(
        headers={'compensate_saga_id': saga_id}))


@shared_task(bind=True, name='t.ignoring_undo')
def ignoring_undo(self: Task, result: Any, name: str, *args: Any,
                  **kwargs: Any) -> None:
    """An undo that raises ``Ignore`` the first time, then succeeds."""
    from celery.exceptions import Ignore as _Ignore
    if client_for(self.app).set(countdown_key(
            self.app, self.request.compensate_saga_id, f'{name}-ignored'),
            1, nx=True):
        note(self, f'ignored:{name}')
        raise _Ignore()
    note(self, f'undo:{name}:{result!r}')


@shared_task(bind=True, name='t.request_depth')
def request_depth(self: Task) -> None:
    """Notes how many requests are stacked while its body runs: 1 means the
    worker's own request object, as without celery_compensate."""
    note(self, f'depth:{len(self.request_stack.stack)}:{self.request.id}')


@shared_task(bind=True, name='t.recursive', compensate_with='t.undo')
def recursive(self: Task, name: str, depth: int = 1) -> str:
    """Calls itself synchronously: only the outer call is the saga step."""
    if depth:
        return recursive(name, depth - 1) + '+outer'
    return 'inner'


@shared_task(bind=True, name='t.replaced', compensate_with='t.undo')
def replaced(self: Task, name: str) -> None:
    """Replaces itself with t.plain: the step's result is the replacement's,
    its undo still gets the step's own arguments."""
    note(self, f'replacing:{name}')
    raise self.replace(plain.si(f'{name}-replacement'))


def around_call(call: Any) -> Any:
    """A user's task annotation around ``__call__``."""
    def __call__(self: Task, *args: Any, **kwargs: Any) -> Any:
        if self.request.id and '.' in self.request.id:
            note(self, 'around')
        return call(self, *args, **kwargs)
    return __call__


@shared_task(bind=True, name='t.forward')
def forward(self: Task, name: str, fail_times: int = 0,
            kill_once: bool = False) -> str:
    """A step without an undo (as a step after a pivot is): its first
    ``fail_times`` runs in a saga fail, then it succeeds; ``kill_once``
    kills the whole worker on its first run."""
    return _forward_body(self, name, fail_times, kill_once)


@shared_task(bind=True, name='t.forward_retrying', autoretry_for=(ValueError,),
             max_retries=1, default_retry_delay=0)
def forward_retrying(self: Task, name: str, fail_times: int = 0) -> str:
    """``t.forward`` with a Celery retry policy of its own (one retry)."""
    return _forward_body(self, name, fail_times, False)


def _forward_body(task: Task, name: str, fail_times: int,
                  kill_once: bool) -> str:
    r = client_for(task.app)
    saga_id = task.request.compensate_saga_id
    note(task, f'start:{name}')
    if kill_once and r.set(
            countdown_key(task.app, saga_id, f'{name}-killed'), 1, nx=True):
        note(task, f'killing:{name}')
        os.killpg(os.getpgid(0), signal.SIGKILL)
    if r.incr(countdown_key(task.app, saga_id, f'{name}-runs')) <= fail_times:
        note(task, f'fail:{name}')
        raise ValueError(f'{name} failed on purpose')
    note(task, f'do:{name}')
    return f'res-{name}'
