"""``install(app)`` and the per-app state it attaches."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from .bootsteps import WORKER_OPTIONS, CompensateRecovery
from .dispatch import Coordinator
from .events import connect_events
from .exceptions import ImproperlyConfigured
from .hooks import CallAnnotation, connect_signals, wrap_app_tasks
from .settings import Settings
from .store import SagaStore

if TYPE_CHECKING:
    from celery import Celery

__all__ = ('install', 'AppState', 'get_state')

logger = get_logger(__name__)

_ATTR = '_compensate_state'


class AppState:
    """What celery_compensate keeps per app: settings, store, coordinator.

    The Redis client is created on first use in each process (redis-py
    pools reset themselves after a fork), never at import.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._lock = threading.Lock()
        #: the signal handlers, connected weakly: they live as long as this
        self.handlers: tuple[Any, ...] = ()
        #: set by the worker bootstep before the pool starts: whether this
        #: worker sends task events (``-E``), and its node name
        self.task_events: bool = False
        self.hostname: str | None = None
        self._store: SagaStore | None = None
        self._coordinator: Coordinator | None = None

    @property
    def store(self) -> SagaStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = SagaStore(self.settings)
        return self._store

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            self._coordinator = Coordinator(self.app, self.settings, self.store)
        return self._coordinator


def install(app: Celery) -> AppState:
    """Add compensation to ``app``.  Idempotent.

    Reads and validates the ``compensate_*`` settings (configure them
    before calling this), wraps every task class of the app so saga steps
    are recorded inside the call, connects the failure signals, and adds
    the worker bootstep that renews leases and runs the recovery sweep
    (with the ``celery worker --without-compensate-recovery`` option).

    Returns:
        AppState: the app's compensation state.
    Raises:
        ImproperlyConfigured: a setting is missing or wrong.
    """
    state = getattr(app, _ATTR, None)
    if state is not None:
        return state
    state = AppState(app, Settings.from_conf(app.conf))
    setattr(app, _ATTR, state)
    _annotate(app)
    state.handlers = (*connect_signals(app), *connect_events(app))
    app.steps['worker'].add(CompensateRecovery)
    for option in WORKER_OPTIONS:
        app.user_options['worker'].add(option)
    return state


def get_state(app: Celery) -> AppState:
    """The state of an installed app.

    Raises:
        ImproperlyConfigured: ``install(app)`` was not called.
    """
    state = getattr(app, _ATTR, None)
    if state is None:
        raise ImproperlyConfigured(
            f'celery_compensate is not installed on app {app.main!r}: '
            'call celery_compensate.install(app) first')
    return state


def _annotate(app: Celery) -> None:
    """Wrap task classes bound from now on (via ``task_annotations``) and
    those already bound."""
    existing: Any = app.conf.task_annotations
    if existing is None:
        existing = ()
    elif not isinstance(existing, (list, tuple)):
        existing = (existing,)
    app.conf.task_annotations = (CallAnnotation(), *existing)
    app.__dict__.pop('annotations', None)  # drop Celery's cached copy
    if app.finalized:
        wrap_app_tasks(app)
