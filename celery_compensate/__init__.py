"""Compensation (sagas) for Celery task chains, recorded in Redis.

Pair tasks with undo tasks (``compensate_with=``), run them with
``saga(...)``, and when a step fails the undos of the steps that completed
run in reverse order on ordinary workers.
"""
from __future__ import annotations

from . import signals
from .canvas import Saga, saga
from .exceptions import (
    CompensateError, CompletionNotRecorded, CorruptSagaRecord,
    ImproperlyConfigured, InvalidSaga, ResultNotSerializable, ResultTooLarge,
    SagaCompensated, SagaCompensationFailed, SagaFailed, SagaForwardFailed,
    SagaNotFinished, SagaNotFound, SagaStoreError, SagaStoreUnavailable, SagaTimeoutError,
    TaskRefused,
)
from .install import install
from .model import SagaState, StepState, UndoState
from .result import SagaResult
from .store import SagaRecord, StepRecord

__version__ = '0.1.0'

__all__ = (
    'install', 'saga', 'Saga', 'SagaResult', 'SagaRecord', 'StepRecord',
    'SagaState', 'StepState', 'UndoState', 'signals',
    'CompensateError', 'CorruptSagaRecord', 'ImproperlyConfigured',
    'InvalidSaga', 'ResultNotSerializable', 'ResultTooLarge', 'SagaNotFound',
    'SagaStoreError', 'SagaStoreUnavailable', 'SagaTimeoutError',
    'TaskRefused', 'CompletionNotRecorded', 'SagaFailed', 'SagaCompensated',
    'SagaCompensationFailed', 'SagaForwardFailed', 'SagaNotFinished',
)
