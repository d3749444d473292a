"""The worker bootsteps: lease renewal and the recovery sweep (worker), and
recording each saga task as held when the consumer receives it
(consumer)."""
from __future__ import annotations

from typing import Any, Callable

from celery import bootsteps
from click import Option

from .appstate import get_state
from .recovery import STALE_BATCH, Recovery

__all__ = ('CompensateRecovery', 'CompensateReceive', 'WORKER_OPTIONS')


#: ``celery worker`` options this library adds.
WORKER_OPTIONS = (
    Option(('--without-compensate-recovery',), is_flag=True, default=False,
           help='Do not run the celery_compensate recovery sweep in this '
                'worker (it still renews the leases of the saga tasks it '
                'holds).'),
)


class CompensateRecovery(bootsteps.StartStopStep):
    """Renew the leases of this worker's saga tasks; sweep for lapsed ones
    (one worker at a time) unless ``--without-compensate-recovery``."""

    label = 'Compensate'
    requires = ('celery.worker.components:Pool',)

    def __init__(self, w: Any, without_compensate_recovery: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        self.sweep = not without_compensate_recovery
        # recorded here, before the pool starts: prefork children inherit it
        state = get_state(w.app)
        state.check_conf(every=0.0)
        state.task_events = bool(getattr(w, 'task_events', False))
        state.hostname = getattr(w, 'hostname', None)

    # celery-types declares Step.create as returning None, but Celery keeps
    # what it returns as the step's obj
    def create(self, w: Any) -> Recovery:  # type: ignore[override]
        state = get_state(w.app)
        recovery = Recovery(w.app, state.settings, sweep=self.sweep,
                            hostname=state.hostname, tracing=state.tracing)
        self.obj = recovery
        # the consumer's CompensateReceive records receipts through it
        w.compensate_recovery = recovery
        return recovery


class CompensateReceive(bootsteps.StartStopStep):
    """Record a receipt for every saga task the consumer receives (see
    :meth:`Recovery.receive`), before the pool or the ETA timer gets it.

    It wraps each task's strategy once the ``Tasks`` step built them, and
    again whenever they are rebuilt (a consumer restart, or
    ``pool_restart`` with ``reload``, which calls ``update_strategies``);
    and the consumer's ``on_task_request``, so a request whose receipt
    waits in a busy worker's batch reaches the pool only once it is
    recorded (:meth:`Recovery.hand_over`).
    """

    label = 'CompensateReceive'
    requires = ('celery.worker.consumer.tasks:Tasks',)

    def start(self, c: Any) -> None:
        recovery = getattr(c.controller, 'compensate_recovery', None)
        if recovery is None:
            return
        recovery.bucketed = lambda: _bucketed(c)
        hub = getattr(c, 'hub', None)
        recovery.call_later = hub.call_later if hub is not None else None
        if hub is not None:
            hub.call_repeatedly(STALE_BATCH, recovery.flush_stale)
        handle = c.on_task_request
        if not getattr(handle, '_compensate_receive', False):
            def on_task_request(request: Any) -> Any:
                if not recovery.hand_over(request, handle):
                    return handle(request)
                return None
            on_task_request._compensate_receive = True  # type: ignore[attr-defined]
            c.on_task_request = on_task_request
            # the strategies took the handler when they were built
            c.update_strategies()
        _wrap_strategies(c, recovery)
        update = c.update_strategies
        if not getattr(update, '_compensate_receive', False):
            def update_strategies(*args: Any, **kwargs: Any) -> Any:
                result = update(*args, **kwargs)
                _wrap_strategies(c, recovery)
                return result
            update_strategies._compensate_receive = True  # type: ignore[attr-defined]
            c.update_strategies = update_strategies

    def stop(self, c: Any) -> None:
        recovery = getattr(c.controller, 'compensate_recovery', None)
        if recovery is not None:
            recovery.drop_batch()

    shutdown = stop


def _wrap_strategies(c: Any, recovery: Recovery) -> None:
    for name, strategy in list(c.strategies.items()):
        if not getattr(strategy, '_compensate_receive', False):
            c.strategies[name] = _receiving(strategy, recovery)


def _bucketed(c: Any) -> list[Any]:
    """The requests waiting in the consumer's rate-limit buckets."""
    out = []
    for bucket in list(getattr(c, 'task_buckets', {}).values()):
        for item in list(getattr(bucket, 'contents', ()) or ()):
            out.append(item[0] if isinstance(item, tuple) else item)
    return out


def _receiving(strategy: Callable[..., Any],
               recovery: Recovery) -> Callable[..., Any]:
    def receive(message: Any, body: Any, ack: Any, reject: Any,
                callbacks: Any, **kwargs: Any) -> Any:
        headers = getattr(message, 'headers', None)
        if isinstance(headers, dict):
            recovery.receive(headers.get('id'), headers)
        return strategy(message, body, ack, reject, callbacks, **kwargs)

    receive._compensate_receive = True  # type: ignore[attr-defined]
    return receive
