"""Signals sent on saga transitions.

Each is sent once per transition, in the process where the transition
happened (the producer for ``saga_started``, a worker for the others), with
``sender`` set to the app.  Handlers that raise are logged, never
propagated into Celery.

==========================  ==========================================
Signal                      Keyword arguments besides ``sender``
==========================  ==========================================
``saga_started``            ``saga_id``, ``steps`` (number of steps)
``saga_completed``          ``saga_id``
``compensation_started``    ``saga_id``, ``step`` (index of the step that
                            failed), ``reason``
``step_compensated``        ``saga_id``, ``step``, ``task_name``
``undo_retry``              ``saga_id``, ``step``, ``attempt`` (the one
                            that failed), ``countdown``, ``error``
``saga_compensated``        ``saga_id``
``compensation_failed``     ``saga_id``, ``step``, ``error``
``saga_forward_failed``     ``saga_id``, ``step`` (past the pivot, it
                            spent its attempts), ``error``
==========================  ==========================================
"""
from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = (
    'saga_started', 'saga_completed', 'compensation_started',
    'step_compensated', 'undo_retry', 'saga_compensated',
    'compensation_failed', 'saga_forward_failed',
)

saga_started = Signal(name='saga_started', providing_args=['saga_id', 'steps'])
saga_completed = Signal(name='saga_completed', providing_args=['saga_id'])
compensation_started = Signal(
    name='compensation_started', providing_args=['saga_id', 'step', 'reason'])
step_compensated = Signal(
    name='step_compensated', providing_args=['saga_id', 'step', 'task_name'])
undo_retry = Signal(
    name='undo_retry',
    providing_args=['saga_id', 'step', 'attempt', 'countdown', 'error'])
saga_compensated = Signal(name='saga_compensated', providing_args=['saga_id'])
compensation_failed = Signal(
    name='compensation_failed', providing_args=['saga_id', 'step', 'error'])
saga_forward_failed = Signal(
    name='saga_forward_failed', providing_args=['saga_id', 'step', 'error'])
