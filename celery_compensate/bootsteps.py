"""The worker bootstep that runs lease renewal and the recovery sweep."""
from __future__ import annotations

from typing import Any

from celery import bootsteps
from click import Option

from .appstate import get_state
from .recovery import Recovery

__all__ = ('CompensateRecovery', 'WORKER_OPTIONS')

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
        return self.obj
