"""Recovery: workers renew the leases of the saga tasks they hold, and one
worker at a time sweeps for sagas whose leases lapsed.

Celery tells nobody when a whole worker is SIGKILLed, when a link waits in
a queue no worker consumes, or when a message is lost: those sagas would
stay RUNNING (or COMPENSATING) forever.  Every dispatched step and undo has
a lease in its saga record; a live worker renews the leases of the tasks it
has reserved or is running, so a lease lapses only when nobody holds the
task.  The sweep finds lapsed sagas through the deadline index, in
O(due sagas), and the ``recover`` command (``store/lua/recover.lua``)
decides what each lapse means.
"""
from __future__ import annotations

import collections
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import redis
from celery.utils.log import get_logger

from .clients import servers
from .coordinator import Coordinator, TraceHooks
from .exceptions import SagaStoreError, SagaStoreUnavailable
from .messages import GENERATION, SAGA_ID
from .model import TaskIdInfo, parse_task_id
from .spool import Spool
from .store import TRANSIENT_ERRORS, Reply, SagaStore, new_token, shard_of

if TYPE_CHECKING:
    from celery import Celery

    from .settings import Settings

__all__ = ('Recovery', 'held_by_this_worker', 'check_persistence')

logger = get_logger(__name__)

#: sagas taken per shard and sweep
SWEEP_BATCH = 100

#: A worker that sent a receipt less than this many seconds ago is busy:
#: its receipts are batched (see :data:`BATCH_WAIT`) instead of sent one
#: by one.
RECEIPT_GAP = 0.02

#: Seconds a busy worker's consumer gathers receipts before it sends them
#: in one pipeline and hands their tasks to the pool: no saga task reaches
#: the pool before its receipt is recorded.
BATCH_WAIT = 0.002

#: A batch older than this has missed its timer (the event loop was
#: busy): it is sent by the next receipt or a repeating check, whichever
#: comes first.
STALE_BATCH = 0.1

#: Timeout of a receipt sent from the consumer's event loop.
QUICK_TIMEOUT = 0.25

#: A receipt sent from the event loop that took longer than this turns
#: them off for a heartbeat (queued instead).
QUICK_SLOW = 0.005

#: Seconds a receipt is left alone by the heartbeat's look for tasks that
#: left the worker (Celery registers the request right after the receipt).
RECENT = 1.0

#: RECEIVE replies for a copy the record does not expect, and why (logged:
#: a copy that can have such a twin checks the record before its body)
_REFUSED = {
    Reply.DONE: 'it is already done',
    Reply.GIVEN_UP: 'it was given up',
    Reply.STALE: 'it was published again; this copy is older',
    Reply.NOT_DISPATCHED: 'its stage was never dispatched',
}


def _snapshot(requests: Iterable[Any]) -> list[Any]:
    # the worker's event loop adds and discards requests while we copy
    for _ in range(10):
        try:
            return list(requests)
        except RuntimeError:  # set changed size during iteration
            continue
    return []


def held_by_this_worker(active_only: bool = False
                        ) -> Iterator[tuple[str, TaskIdInfo]]:
    """The saga steps and undo attempts this worker process holds: reserved
    (prefetched, or waiting for their ETA) or running.

    Arguments:
        active_only: only those running (a worker shutting down).
    Yields:
        tuple: ``(task id, what it is)``.
    """
    from celery.worker import state
    names = ('active_requests',) if active_only else (
        'active_requests', 'reserved_requests', 'scheduled_requests')
    requests: list[Any] = []
    for name in names:
        requests.extend(_snapshot(getattr(state, name, ())))
    for request in requests:
        task_id: str | None = getattr(request, 'id', None)
        info = parse_task_id(task_id)
        if task_id is not None and info is not None:
            yield task_id, info


def _succeeded(task_id: str) -> bool:
    """Whether this worker saw ``task_id`` succeed (Celery keeps the last
    ``CELERY_WORKER_SUCCESSFUL_MAX`` of them, for three hours)."""
    from celery.worker import state
    return task_id in state.successful_requests


def check_persistence(client: Any, safe_url: str) -> list[str]:
    """Warnings about a saga store that can lose records: every primary of
    a Redis Cluster is checked, and the primary behind Sentinels.

    Returns:
        list: one line per problem (empty when AOF is on and nothing is
        evicted).
    """
    problems = []
    for node, server in servers(client):
        where = safe_url if node is None else f'{safe_url} (node {node})'
        memory = server.info('memory')
        policy = memory.get('maxmemory_policy', 'noeviction')
        if int(memory.get('maxmemory', 0) or 0) and policy != 'noeviction':
            problems.append(
                f'the saga store at {where} evicts keys (maxmemory-policy '
                f'{policy}): an evicted saga is a lost compensation; set '
                'maxmemory-policy noeviction')
        persistence = server.info('persistence')
        if not int(persistence.get('aof_enabled', 0) or 0):
            problems.append(
                f'the saga store at {where} has no append-only file: a Redis '
                'restart loses the sagas recorded since its last snapshot; '
                'set appendonly yes')
    return problems


class Recovery:
    """Lease renewal and, optionally, the recovery sweep of one worker.

    Each runs in its own thread of the worker's main process (which
    outlives pool children), with its own Redis connections, so a slow
    Redis never stalls the worker's event loop and a long sweep never
    delays this worker's renewals.

    Arguments:
        app: the worker's app.
        settings: its compensation settings.
        sweep: whether this worker takes part in the sweep.
        hostname: the worker's node name (its spool of unrecorded
            completions, :mod:`celery_compensate.spool`).
        tracing: the app's tracing, when it is on (what the sweep
            publishes goes to its saga's trace).
    """

    def __init__(self, app: Celery, settings: Settings,
                 sweep: bool = True, hostname: str | None = None,
                 tracing: TraceHooks | None = None) -> None:
        self.app = app
        self.settings = settings
        self.sweep_enabled = sweep
        #: completions this worker's pool children could not record
        self.spool = Spool.of_worker(settings.key_prefix, hostname)
        self.store = SagaStore(settings)
        self.coordinator = Coordinator(app, settings, self.store, tracing)
        # one sweeper at a time; another takes over within lock_ttl of its
        # death.  A shard not swept for two intervals means Redis (or every
        # sweeper) was away: the leases that lapsed meanwhile are not
        # trusted until live workers had ``hold`` seconds to renew them.
        self.lock_ttl = max(1.0, 3 * settings.recovery_interval)
        self.gap = 2 * settings.recovery_interval
        self.hold = 2 * settings.heartbeat_interval
        self.lock = self.store.client.lock(
            self.store.keys.lock(), timeout=self.lock_ttl, blocking=False,
            thread_local=False)
        self._owner = False
        self._stop = threading.Event()      # stop sweeping
        self._drained = threading.Event()   # stop renewing
        self._draining = False
        self._threads: list[threading.Thread] = []
        self._unreachable_since: float | None = None
        self._last_error = float('-inf')
        #: whether the last sweep held off (see :meth:`sweep`)
        self.was_held = False
        self._hold_told = False
        #: the saga tasks this worker received, by task id: what each is and
        #: the holder token it was received as (see :meth:`receive`)
        self.holding: dict[str, tuple[TaskIdInfo, str, float]] = {}
        #: recorded as the holder of what nobody was seen receiving
        self.token = new_token()
        #: set by the consumer bootstep: the requests waiting in its
        #: rate-limit buckets (in none of Celery's request sets, yet held)
        self.bucketed: Callable[[], Iterable[Any]] = tuple
        #: receipts the consumer queued for the ``compensate-receipts``
        #: thread: ``(task id, what it is, holder, generation)``
        self._receipts: collections.deque[
            tuple[str, TaskIdInfo, str, int]] = collections.deque()
        self._receipt_due = threading.Event()
        self._last_receipt = float('-inf')
        self._quick_off_until = float('-inf')
        #: set by the consumer bootstep when the consumer runs an event
        #: loop: ``call_later(delay, fn)`` there.  Then a busy worker's
        #: receipts are gathered here, in that loop's thread, and the
        #: requests they belong to wait in ``_deferred`` until they are
        #: recorded
        self.call_later: Callable[[float, Callable[[], None]], Any] | None = (
            None)
        self._batch: dict[str, tuple[str, TaskIdInfo, str, int]] = {}
        self._batch_since = 0.0
        self._deferred: list[tuple[Any, Callable[[Any], Any]]] = []
        #: the client of receipts sent from the consumer's event loop: a
        #: short timeout, no resend (it must not stall the consumer)
        self.quick = SagaStore(settings, socket_timeout=min(
            QUICK_TIMEOUT, settings.redis_socket_timeout), retries=0)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._renew_loop, daemon=True,
                                          name='compensate-leases'),
                         threading.Thread(target=self._receipt_loop,
                                          daemon=True,
                                          name='compensate-receipts')]
        if self.sweep_enabled:
            self._threads.append(threading.Thread(
                target=self._sweep_loop, daemon=True, name='compensate-sweep'))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sweeping now.  Renewal goes on while tasks still run (a warm
        shutdown waits for them after this bootstep stopped), and ends when
        none is left."""
        self._stop.set()
        self._draining = True
        for thread in self._threads[2:]:
            thread.join(timeout)
        if self._owner:
            try:
                self.lock.release()
            except redis.RedisError:
                pass
            self._owner = False

    def _renew_loop(self) -> None:
        self._warn_persistence()
        while not self._drained.is_set():
            started = time.monotonic()
            if self._draining and not any(held_by_this_worker(True)):
                break
            self._guard(self.renew)
            self._drained.wait(max(0.0, self.settings.heartbeat_interval
                                   - (time.monotonic() - started)))
        # what ended during the last heartbeat, and what a warm shutdown
        # returns to the broker (reserved and ETA messages)
        self._guard(partial(self.renew, last=True))

    def _receipt_loop(self) -> None:
        while not self._drained.is_set():
            self._receipt_due.wait(self.settings.heartbeat_interval)
            self._receipt_due.clear()
            started = time.monotonic()
            self._guard(self.send_receipts)
            if self._draining and not any(held_by_this_worker(True)):
                break
            # what arrives meanwhile goes in the next pipeline
            self._drained.wait(max(0.0, RECEIPT_GAP
                                   - (time.monotonic() - started)))

    def _sweep_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._guard(self.sweep)
            self._stop.wait(max(0.0, self.settings.recovery_interval
                                - (time.monotonic() - started)))

    # -- the work -----------------------------------------------------------

    def receive(self, task_id: str | None, headers: Any) -> None:
        """The worker's consumer took a message from the broker: record the
        saga task as held by this worker, so a worker killed from now on is
        noticed within the step's lease, not the queue timeout.

        When the worker is not busy (no receipt sent in the last
        :data:`RECEIPT_GAP` seconds) the receipt is sent at once, before
        Celery sees the task, on a client with a short timeout and no
        resend.  A busy worker with an event loop gathers the receipts of
        :data:`BATCH_WAIT` seconds and sends them in one pipeline; the
        requests wait for it (:meth:`hand_over`), so no saga task reaches
        the pool before its receipt is recorded.  When the store is slow
        or unreachable (or the consumer has no event loop and is busy) the
        receipt is queued for the ``compensate-receipts`` thread and the
        task goes on at once.  Called in the consumer's event loop: it
        never raises.
        """
        info = parse_task_id(task_id)
        if info is None or task_id is None:
            return
        headers = headers or {}
        try:
            # a copy without the identity headers (a replacement sent by
            # ``self.replace``) has no generation of its own: 0, unchecked
            generation = (int(headers.get(GENERATION) or 1)
                          if headers.get(SAGA_ID) is not None else 0)
        except (TypeError, ValueError):
            generation = 0
        receipt = (task_id, info, new_token(), generation)
        now = time.monotonic()
        quick = now >= self._quick_off_until
        if quick and not self._batch and (
                now - self._last_receipt >= RECEIPT_GAP
                or self.call_later is None):
            self._send_now([receipt], now)
            return
        if quick and self.call_later is not None:
            if self._batch and now - self._batch_since > STALE_BATCH:
                self.send_batch()       # its timer did not fire in time
            if not self._batch:
                try:
                    self.call_later(BATCH_WAIT, self.send_batch)
                except Exception:  # noqa: BLE001 - never into the consumer
                    self._send_now([receipt], now)
                    return
                self._batch_since = now
            self._batch[task_id] = receipt
            return
        self._receipts.append(receipt)
        self._receipt_due.set()

    def _send_now(self, items: list[tuple[str, TaskIdInfo, str, int]],
                  now: float) -> None:
        try:
            self._note_receipts(items, self.quick)
        except Exception:  # noqa: BLE001 - never into the consumer
            # the heartbeat records them; no direct receipt for a heartbeat
            self._quick_off_until = now + self.settings.heartbeat_interval
        finally:
            self._last_receipt = done = time.monotonic()
            if done - now > QUICK_SLOW * (1 + len(items) / 8):
                # a slow store: the event loop must not wait on it,
                # receipts are queued for a heartbeat
                self._quick_off_until = (
                    done + self.settings.heartbeat_interval)

    def hand_over(self, request: Any, handle: Callable[[Any], Any]) -> bool:
        """The consumer hands ``request`` to the pool: hold it back while
        its receipt waits in the batch (:meth:`send_batch` hands it over).

        Returns:
            bool: ``True`` if it was held back.
        """
        if getattr(request, 'id', None) in self._batch:
            self._deferred.append((request, handle))
            return True
        return False

    def send_batch(self) -> None:
        """Send the gathered receipts in one pipeline, then hand their
        requests to the pool (the consumer's event loop, :data:`BATCH_WAIT`
        after the first).  Never raises."""
        items = list(self._batch.values())
        self._batch.clear()
        deferred, self._deferred = self._deferred, []
        if items:
            self._send_now(items, time.monotonic())
        for request, handle in deferred:
            try:
                handle(request)
            except Exception:  # noqa: BLE001 - never into the consumer
                logger.exception('celery_compensate: could not hand task %s '
                                 'to the pool', getattr(request, 'id', '?'))

    def flush_stale(self) -> None:
        """Send a batch whose timer did not fire in time (the consumer's
        event loop calls this every :data:`STALE_BATCH` seconds)."""
        if self._batch and time.monotonic() - self._batch_since > STALE_BATCH:
            self.send_batch()

    def drop_batch(self) -> None:
        """The consumer stops (a restart after a lost connection, or
        shutdown): what waits in the batch goes back to the broker with
        the consumer's unacknowledged messages, as Celery's own reserved
        requests do; their receipts were never sent."""
        self._batch.clear()
        self._deferred.clear()

    def send_receipts(self) -> int:
        """Record what the consumer received and queued since the last
        call, in one pipeline (the ``compensate-receipts`` thread).

        Returns:
            int: how many receipts were sent.
        """
        items = []
        while self._receipts:
            items.append(self._receipts.popleft())
        if items:
            self._last_receipt = time.monotonic()
            self._note_receipts(items, self.store)
        return len(items)

    def _note_receipts(self, items: list[tuple[str, TaskIdInfo, str, int]],
                       store: SagaStore) -> None:
        try:
            replies = store.receive_many([
                (info.saga_id, info.index,
                 info.attempt if info.is_undo else None, generation, holder)
                for _, info, holder, generation in items])
        except Exception:
            # the heartbeat marks them held (as this holder) instead
            for task_id, info, holder, _ in items:
                self.holding.setdefault(task_id,
                                        (info, holder, time.monotonic()))
            raise
        for (task_id, info, holder, _), verdict in zip(items, replies,
                                                       strict=True):
            if verdict is Reply.HELD or (verdict is Reply.DONE
                                         and not info.is_undo):
                # a step that ended before its receipt went out is still
                # reported at the heartbeat: its success confirms the
                # stage it dispatched
                self.holding[task_id] = (info, holder, time.monotonic())
            if verdict is not Reply.HELD and verdict in _REFUSED:
                # usually the task ran and ended before its queued receipt
                # went out; else a duplicate someone sent: a copy that
                # could have such a twin checks the record before its body
                # runs, and the record ignores a duplicate's outcome
                logger.debug('saga %s: the receipt of step %d came when %s',
                             info.saga_id, info.index, _REFUSED[verdict])

    def renew(self, last: bool = False) -> int:
        """Report the forward steps that left this worker since the last
        heartbeat (:meth:`SagaStore.left`), then renew the leases of what
        it holds (one pipeline each).

        Arguments:
            last: the worker is about to exit: what is not running any
                more left it, however recently it was received.

        Returns:
            int: how many leases were renewed.
        """
        self.send_receipts()        # so that what they hold is known
        # a task received in the last moment may not be among Celery's
        # requests yet (the consumer adds it right after the receipt): it
        # is looked at next time
        recent = time.monotonic() - (0.0 if last else RECENT)
        held = dict(held_by_this_worker(active_only=self._draining))
        # read after the snapshot: a step whose child spooled its
        # completion and ended meanwhile is in one or the other; one still
        # waiting in the spool stays held
        held.update(self.record_unrecorded())
        if not self._draining:
            for request in _snapshot(self.bucketed()):
                task_id = getattr(request, 'id', None)
                info = parse_task_id(task_id)
                if info is not None and task_id is not None:
                    held[task_id] = info
        gone = [task_id for task_id, (_, _, at) in list(self.holding.items())
                if task_id not in held and at < recent]
        left = []
        for task_id in gone:
            info, holder, _ = self.holding.pop(task_id)
            if not info.is_undo:
                left.append((task_id, info, holder))
        if left:
            try:
                self.store.left([(info.saga_id, info.index, holder,
                                  _succeeded(task_id))
                                 for task_id, info, holder in left])
            except Exception:
                # told at the next heartbeat (unless received again)
                for task_id, info, holder in left:
                    self.holding.setdefault(task_id, (info, holder, 0.0))
                raise
        if not held:
            return 0
        return self.store.renew(
            [(info.saga_id, info.index,
              info.attempt if info.is_undo else None,
              self.holding.get(task_id, (info, self.token, 0.0))[1])
             for task_id, info in held.items()])

    def record_unrecorded(self) -> dict[str, TaskIdInfo]:
        """Record the completions this worker's pool children could not
        (the store was unreachable past ``compensate_record_retry_timeout``)
        with their own tokens, publish what each made due and confirm it,
        as the child would have.

        Returns:
            dict: the task id and step of each completion still waiting
            (the store is still unreachable): their steps stay held.
        """
        if self.spool is None:
            return {}
        waiting: dict[str, TaskIdInfo] = {}
        for entry in self.spool.entries():
            info = TaskIdInfo(entry.saga_id, entry.index, False)
            if waiting:         # the store is away: the rest wait too
                waiting[entry.task_id] = info
                continue
            if not self.spool.claim(entry.task_id):
                # another process records it: still held meanwhile
                waiting[entry.task_id] = info
                continue
            try:
                outcome = self.store.step_done(
                    entry.saga_id, entry.index, entry.result, entry.token)
            except SagaStoreUnavailable:
                self.spool.unclaim(entry.task_id)
                waiting[entry.task_id] = info
                continue
            except SagaStoreError as exc:
                logger.error('saga %s: the completion of step %d cannot be '
                             'recorded: %s', entry.saga_id, entry.index, exc)
                self.spool.remove(entry.task_id)
                continue
            # forgotten before publishing: a worker dying in between leaves
            # the next stage to the outbox, never published twice
            self.spool.remove(entry.task_id)
            _, holder, _ = self.holding.pop(entry.task_id,
                                            (info, self.token, 0.0))
            if outcome.status is Reply.MISSING:
                logger.error('saga %s: step %d completed while the store was '
                             'away, and the saga has expired since',
                             entry.saga_id, entry.index)
                continue
            logger.warning('saga %s: step %d recorded by its worker (its pool '
                           'child could not reach the store): %s',
                           entry.saga_id, entry.index, outcome.status.value)
            try:
                self.coordinator.apply(entry.saga_id, outcome,
                                       step=entry.index)
            except Exception:  # noqa: BLE001 - the sweep publishes it again
                logger.exception('saga %s: what step %d made due was not '
                                 'published; the sweep publishes it again',
                                 entry.saga_id, entry.index)
                continue
            if outcome.status is Reply.NEXT:
                # published: what it dispatched leaves the outbox
                self._guard(partial(self.store.left, [
                    (entry.saga_id, entry.index, holder, True)]))
        return waiting

    def sweep(self) -> int:
        """If this worker is the sweeper, recover every saga that is due.

        Returns:
            int: how many sagas were acted on.
        """
        if not self._lead():
            return 0
        held, due, full = self.store.due(SWEEP_BATCH, self.gap, self.hold)
        if held and not self._hold_told:
            # once per hold, not once per sweep: on a first start it is
            # routine, and repeated it reads like a fault
            logger.info('celery_compensate: the sweep starts in %.1fs: no '
                        'sweep ran for a while (a first start, no worker '
                        'running, or Redis unreachable), so live workers '
                        'renew their leases first', held)
        self.was_held = self._hold_told = bool(held)
        if held:
            return 0
        if time.monotonic() - self._last_error < self.hold:
            # this worker just saw the store fail: leases may have lapsed
            # only because nobody could renew them
            self.was_held = True
            return 0
        done = 0
        extended = time.monotonic()
        for saga_id in due:
            if self._stop.is_set():
                break
            if time.monotonic() - extended > self.lock_ttl / 3:
                self._lead()   # a long sweep keeps its lock
                extended = time.monotonic()
            try:
                outcome = self.coordinator.recover(saga_id)
                # a saga's :due score is a lower bound: one that lapsed
                # early finds nothing lapsed (and is rescored exactly)
                done += bool(outcome.stopped or outcome.undos
                             or outcome.forward
                             or outcome.new_state is not outcome.old_state)
            except SagaStoreUnavailable:
                raise
            except SagaStoreError as exc:
                self._quarantine(saga_id, str(exc))
                continue
            if outcome.status is Reply.STUCK:
                self._quarantine(saga_id, 'it is neither settled nor has '
                                 'anything in flight')
        if full:
            logger.info('celery_compensate: more sagas are due in %d shards; '
                        'the next sweep takes them', len(full))
        return done

    def _quarantine(self, saga_id: str, why: str) -> None:
        logger.error('saga %s: the sweep cannot process it (%s); moved to %s',
                     saga_id, why,
                     self.store.keys.bad(shard_of(saga_id)))
        self.store.quarantine(saga_id)

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
        except (SagaStoreUnavailable, *TRANSIENT_ERRORS) as exc:
            self._last_error = time.monotonic()
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                logger.warning('celery_compensate: leases and recovery wait '
                               'for the saga store: %s', exc)
        except Exception:  # noqa: BLE001
            self._last_error = time.monotonic()
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
