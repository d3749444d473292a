"""Recovery: workers renew the leases of the saga tasks they hold, and one
worker at a time sweeps for sagas whose leases lapsed.

Celery tells nobody when a whole worker is SIGKILLed, when a link waits in
a queue no worker consumes, or when a message is lost: those sagas would
stay RUNNING (or COMPENSATING) forever.  Every dispatched step and undo has
a lease in its saga record; a live worker renews the leases of the tasks it
has reserved or is running, so a lease lapses only when nobody holds the
task.  The sweep finds lapsed sagas through the deadline index, in
O(due sagas), and the ``RECOVER`` script decides what each lapse means.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

import redis
from celery.utils.log import get_logger

from .dispatch import Coordinator
from .exceptions import SagaStoreError, SagaStoreUnavailable
from .model import parse_task_id
from .store import SagaStore, shard_of

if TYPE_CHECKING:
    from celery import Celery

    from .settings import Settings

__all__ = ('Recovery', 'held_by_this_worker', 'check_persistence')

logger = get_logger(__name__)

#: sagas taken per shard and sweep
SWEEP_BATCH = 100


def held_by_this_worker() -> Iterator[tuple[str, int, int | None]]:
    """The saga steps and undo attempts this worker process holds: reserved
    (prefetched, or waiting for their ETA) or running.

    Yields:
        tuple: ``(saga id, step index, undo attempt or None)``.
    """
    from celery.worker import state
    requests: set[Any] = set()
    for name in ('active_requests', 'reserved_requests', 'scheduled_requests'):
        requests.update(getattr(state, name, ()))
    for request in requests:
        info = parse_task_id(getattr(request, 'id', None))
        if info is not None:
            yield (info.saga_id, info.index,
                   info.attempt if info.is_undo else None)


def check_persistence(client: redis.Redis, safe_url: str) -> list[str]:
    """Warnings about a saga store that can lose records.

    Returns:
        list: one line per problem (empty when AOF is on and nothing is
        evicted).
    """
    problems = []
    memory = client.info('memory')
    policy = memory.get('maxmemory_policy', 'noeviction')
    if int(memory.get('maxmemory', 0) or 0) and policy != 'noeviction':
        problems.append(
            f'the saga store at {safe_url} evicts keys (maxmemory-policy '
            f'{policy}): an evicted saga is a lost compensation; set '
            'maxmemory-policy noeviction')
    persistence = client.info('persistence')
    if not int(persistence.get('aof_enabled', 0) or 0):
        problems.append(
            f'the saga store at {safe_url} has no append-only file: a Redis '
            'restart loses the sagas recorded since its last snapshot; set '
            'appendonly yes')
    return problems


class Recovery:
    """Lease renewal and, optionally, the recovery sweep of one worker.

    It runs in a thread of the worker's main process (which outlives pool
    children), with its own Redis connections, so a slow Redis never
    stalls the worker's event loop.

    Arguments:
        app: the worker's app.
        settings: its compensation settings.
        sweep: whether this worker takes part in the sweep.
    """

    def __init__(self, app: Celery, settings: Settings,
                 sweep: bool = True) -> None:
        self.app = app
        self.settings = settings
        self.sweep_enabled = sweep
        self.store = SagaStore(settings)
        self.coordinator = Coordinator(app, settings, self.store)
        # one sweeper at a time; another takes over within lock_ttl of its
        # death, so a gap longer than that means nobody could sweep
        self.lock_ttl = max(1.0, 3 * settings.recovery_interval)
        self.gap = self.lock_ttl + 2 * settings.recovery_interval
        self.hold = 2 * settings.heartbeat_interval
        self.lock = self.store.client.lock(
            self.store.lock_key(), timeout=self.lock_ttl, blocking=False,
            thread_local=False)
        self._owner = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_since: float | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, daemon=True,
                                        name='compensate-recovery')
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._owner:
            try:
                self.lock.release()
            except redis.RedisError:
                pass
            self._owner = False

    def run(self) -> None:
        self._warn_persistence()
        next_renew = next_sweep = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_renew:
                self._guard(self.renew)
                next_renew = now + self.settings.heartbeat_interval
            if self.sweep_enabled and now >= next_sweep:
                self._guard(self.sweep)
                next_sweep = now + self.settings.recovery_interval
            wake = min(next_renew, next_sweep if self.sweep_enabled
                       else next_renew)
            self._stop.wait(max(0.0, wake - time.monotonic()))

    # -- the work -----------------------------------------------------------

    def renew(self) -> int:
        """Renew the leases of what this worker holds (one round trip).

        Returns:
            int: how many leases were renewed.
        """
        held = list(held_by_this_worker())
        return self.store.renew(held) if held else 0

    def sweep(self) -> int:
        """If this worker is the sweeper, recover every saga that is due.

        Returns:
            int: how many sagas were acted on.
        """
        if not self._lead():
            return 0
        held, due, full = self.store.due(SWEEP_BATCH, self.gap, self.hold)
        if held:
            logger.info('celery_compensate: the sweep waits %.1fs: no sweep '
                        'ran for a while (Redis unreachable, or no worker), '
                        'so live workers renew their leases first', held)
        done = 0
        for saga_id in due:
            try:
                self.coordinator.recover(saga_id)
                done += 1
            except SagaStoreUnavailable:
                raise
            except SagaStoreError as exc:
                logger.error('saga %s: the sweep cannot process it (%s); '
                             'moved to %s', saga_id, exc,
                             self.store.quarantine_key(shard_of(saga_id)))
                self.store.quarantine(saga_id)
        if full:
            logger.info('celery_compensate: more sagas are due in %d shards; '
                        'the next sweep takes them', len(full))
        return done

    def _lead(self) -> bool:
        """Hold (or take) the sweeper lock."""
        if self._owner:
            try:
                self.lock.reacquire()
                return True
            except redis.exceptions.LockError:
                self._owner = False
        self._owner = bool(self.lock.acquire(blocking=False))
        return self._owner

    def _guard(self, fn: Any) -> None:
        """Run ``fn``; never let an error end the thread."""
        try:
            fn()
            if self._unreachable_since is not None:
                logger.info('celery_compensate: the saga store is reachable '
                            'again')
                self._unreachable_since = None
        except (SagaStoreUnavailable, redis.ConnectionError,
                redis.TimeoutError) as exc:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                logger.warning('celery_compensate: leases and recovery wait '
                               'for the saga store: %s', exc)
        except Exception:  # noqa: BLE001
            logger.exception('celery_compensate: %s failed',
                             getattr(fn, '__name__', fn))

    def _warn_persistence(self) -> None:
        try:
            problems = check_persistence(self.store.client,
                                         self.settings.safe_redis_url)
        except redis.RedisError as exc:
            logger.info('celery_compensate: could not check the saga store\'s '
                        'persistence settings: %s', exc)
            return
        for line in problems:
            logger.warning('celery_compensate: %s', line)
