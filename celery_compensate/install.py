"""``install(app)``: wires celery_compensate into an app (the per-app state
lives in :mod:`celery_compensate.appstate`)."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from celery.utils.log import get_logger

from .bootsteps import WORKER_OPTIONS, CompensateReceive, CompensateRecovery
from .appstate import AppState, attach_state, find_state, get_state
from .monitoring import connect_events
from .settings import Settings, SettingWarning, unknown_keys
from .worker import CallAnnotation, connect_signals, wrap_app_tasks

if TYPE_CHECKING:
    from celery import Celery

__all__ = ('install', 'AppState', 'get_state')

logger = get_logger(__name__)

def install(app: Celery) -> AppState:
    """Add compensation to ``app``.  Idempotent.

    Reads and validates the ``compensate_*`` settings (configure them
    before calling this: a key that is no setting, or a setting changed
    later, is warned about with a :class:`SettingWarning`), wraps every task class of the app so saga steps
    are recorded inside the call, connects the failure signals, and adds
    the worker bootstep that renews leases and runs the recovery sweep
    (with the ``celery worker --without-compensate-recovery`` option).

    Returns:
        AppState: the app's compensation state.
    Raises:
        ImproperlyConfigured: a setting is missing or wrong.
    """
    state = find_state(app)
    if state is not None:
        return state
    for key, close in unknown_keys(app.conf):
        warnings.warn(
            f'{key} is not a celery_compensate setting'
            + (f': did you mean {close}?' if close else ''),
            SettingWarning, stacklevel=2)
    state = AppState(app, Settings.from_conf(app.conf))
    attach_state(app, state)
    _annotate(app)
    state.handlers = (*connect_signals(app), *connect_events(app))
    app.steps['worker'].add(CompensateRecovery)
    app.steps['consumer'].add(CompensateReceive)
    for option in WORKER_OPTIONS:
        app.user_options['worker'].add(option)
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
    if app.finalized:  # type: ignore[attr-defined]  # not in celery-types
        wrap_app_tasks(app)
