"""The worker bootsteps: lease renewal and the recovery sweep (worker), and
recording each saga task as held when the consumer receives it
(consumer)."""
from __future__ import annotations

from typing import Any, Callable

from celery import bootsteps
from click import Option

from celery.utils.log import get_logger

from .appstate import get_state
from .recovery import Recovery

__all__ = ('CompensateRecovery', 'CompensateReceive', 'WORKER_OPTIONS')

logger = get_logger(__name__)

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
        state.task_events = bool(getattr(w, 'task_events', False))
        state.hostname = getattr(w, 'hostname', None)

    def create(self, w: Any) -> Recovery:
        self.obj = Recovery(w.app, get_state(w.app).settings, sweep=self.sweep)
        # the consumer's CompensateReceive records receipts through it
        w.compensate_recovery = self.obj
        return self.obj


class CompensateReceive(bootsteps.StartStopStep):
    """Record every saga task the consumer receives as held by this worker
    before the pool (or the ETA timer) gets it, and drop a copy the saga
    record already settled, before its body can run.

    It wraps each task's strategy after the ``Tasks`` step (re)built them,
    so it follows consumer restarts.
    """

    label = 'CompensateReceive'
    requires = ('celery.worker.consumer.tasks:Tasks',)

    def start(self, c: Any) -> None:
        recovery = getattr(c.controller, 'compensate_recovery', None)
        if recovery is None:
            return
        for name, strategy in list(c.strategies.items()):
            if not getattr(strategy, '_compensate_receive', False):
                c.strategies[name] = _receiving(strategy, recovery,
                                                c.connection_errors)


def _receiving(strategy: Callable[..., Any], recovery: Recovery,
               errors: Any) -> Callable[..., Any]:
    def receive(message: Any, body: Any, ack: Any, reject: Any,
                callbacks: Any, **kwargs: Any) -> Any:
        headers = getattr(message, 'headers', None)
        if isinstance(headers, dict) and not recovery.receive(
                headers.get('id'), headers,
                getattr(message, 'delivery_info', None)):
            ack(logger, errors)
            return None
        return strategy(message, body, ack, reject, callbacks, **kwargs)

    receive._compensate_receive = True  # type: ignore[attr-defined]
    return receive
