"""``install(app)``: wires celery_compensate into an app (the per-app state
lives in :mod:`celery_compensate.appstate`)."""
from __future__ import annotations

import warnings
from collections import ChainMap
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from .bootsteps import WORKER_OPTIONS, CompensateReceive, CompensateRecovery
from .appstate import AppState, attach_state, find_state, get_state
from .exceptions import ImproperlyConfigured
from .monitoring import connect_events
from .settings import Settings, SettingWarning, unknown_keys
from .worker import CallAnnotation, connect_signals, wrap_app_tasks

if TYPE_CHECKING:
    from celery import Celery

    from .tracing import Tracing

__all__ = ('install', 'AppState', 'get_state')

logger = get_logger(__name__)

def install(app: Celery, tracing: bool | None = None) -> AppState:
    """Add compensation to ``app``.  Idempotent.

    Reads and validates the ``compensate_*`` settings (configure them
    before calling this: a key that is no setting, or a setting changed
    later, is warned about with a :class:`SettingWarning`), wraps every task class of the app so saga steps
    are recorded inside the call, connects the failure signals, and adds
    the worker bootstep that renews leases and runs the recovery sweep
    (with the ``celery worker --without-compensate-recovery`` option).

    Arguments:
        tracing: emit OpenTelemetry spans (see :mod:`celery_compensate.tracing`);
            ``None``: as the ``compensate_tracing`` setting says.

    Returns:
        AppState: the app's compensation state.
    Raises:
        ImproperlyConfigured: a setting is missing or wrong, or tracing is
            on without OpenTelemetry (``pip install celery-compensate[otel]``).
    """
    state = find_state(app)
    if state is not None:
        if tracing is not None and bool(tracing) != (state.tracing is not None):
            warnings.warn(
                f'install(app, tracing={tracing!r}) on an app installed '
                f'already (tracing {"on" if state.tracing else "off"}): '
                'ignored; pass it to the first install()',
                SettingWarning, stacklevel=2)
        return state
    for key, close in unknown_keys(app.conf):
        warnings.warn(
            f'{key} is not a celery_compensate setting'
            + (f': did you mean {close}?' if close else ''),
            SettingWarning, stacklevel=2)
    conf: Any = app.conf
    if tracing is not None:
        conf = ChainMap({Settings.tracing.key: tracing}, conf)
    state = AppState(app, Settings.from_conf(conf))
    traced: tuple[Any, ...] = ()
    if state.settings.tracing:
        tracer = _tracing(state)
        state.tracing, traced = tracer, tracer.handlers
    attach_state(app, state)
    _annotate(app)
    state.handlers = (*connect_signals(app), *connect_events(app), *traced)
    app.steps['worker'].add(CompensateRecovery)
    app.steps['consumer'].add(CompensateReceive)
    for option in WORKER_OPTIONS:
        app.user_options['worker'].add(option)
    return state


def _tracing(state: AppState) -> Tracing:
    """The app's tracing, imported only now: with tracing off,
    OpenTelemetry is never imported and nothing is added per step.

    Raises:
        ImproperlyConfigured: OpenTelemetry is not installed.
    """
    try:
        from .tracing import Tracing
    except ImportError as exc:
        if not (exc.name or '').startswith('opentelemetry'):
            raise
        raise ImproperlyConfigured(
            f'{Settings.tracing.key} is on but OpenTelemetry is not '
            f'installed ({exc}): pip install celery-compensate[otel]'
        ) from None
    return Tracing(state)


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
    if app.finalized:  # type: ignore[attr-defined]  # not in celery-types
        wrap_app_tasks(app)
