"""What celery_compensate keeps per app, and how every module finds it.

``install(app)`` attaches one :class:`AppState` to the app; the worker hooks,
the bootstep, monitoring, the canvas, results and the CLI look it up here
(never through :mod:`celery_compensate.install`, which only wires things).
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

from .coordinator import Coordinator, TraceHooks
from .exceptions import ImproperlyConfigured
from .settings import Settings, SettingWarning, given
from .store import SagaStore

if TYPE_CHECKING:
    from celery import Celery

__all__ = ('AppState', 'get_state', 'find_state', 'attach_state')

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
        #: set by ``install()`` when tracing is on
        #: (:class:`celery_compensate.tracing.Tracing`)
        self.tracing: TraceHooks | None = None
        self._coordinator: Coordinator | None = None
        #: the settings as given to install(): a later change is told once
        self.given = given(app.conf)
        self._warned: set[str] = set()
        self._next_check = 0.0

    @property
    def store(self) -> SagaStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = SagaStore(self.settings)
        return self._store

    def check_conf(self, every: float = 10.0) -> None:
        """Warn (once per setting) when a ``compensate_*`` setting was
        changed after ``install(app)``: the change is ignored.  Looked at
        most every ``every`` seconds (a saga start calls it)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + every
        for key, value in given(self.app.conf).items():
            if value != self.given[key] and key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f'{key} was changed after install(app): the change is '
                    'ignored; configure the app before calling '
                    'install(app)', SettingWarning, stacklevel=3)

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            self._coordinator = Coordinator(self.app, self.settings,
                                            self.store, self.tracing)
        return self._coordinator


def find_state(app: Any) -> AppState | None:
    """The state of ``app``, or ``None`` when it is not installed (signal
    handlers and the task wrapper use this: they must never raise)."""
    return getattr(app, _ATTR, None)


def attach_state(app: Celery, state: AppState) -> None:
    """Attach ``state`` to ``app`` (done once, by ``install()``)."""
    setattr(app, _ATTR, state)


def get_state(app: Celery) -> AppState:
    """The state of an installed app.

    Raises:
        ImproperlyConfigured: ``install(app)`` was not called.
    """
    state = find_state(app)
    if state is None:
        raise ImproperlyConfigured(
            f'celery_compensate is not installed on app {app.main!r}: '
            'call celery_compensate.install(app) first')
    return state
