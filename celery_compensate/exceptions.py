"""The exceptions celery_compensate raises: one tree under CompensateError."""
from __future__ import annotations

from celery.exceptions import CeleryError
from celery.exceptions import TimeoutError as CeleryTimeoutError

__all__ = (
    'CompensateError', 'ImproperlyConfigured', 'InvalidSaga', 'SagaNotFound',
    'SagaStoreError', 'SagaStoreUnavailable', 'SagaTimeoutError',
    'ResultNotSerializable', 'ResultTooLarge', 'CorruptSagaRecord',
    'TaskRefused', 'CompletionNotRecorded', 'SagaFailed', 'SagaCompensated',
    'SagaCompensationFailed', 'SagaForwardFailed', 'SagaNotFinished',
)


class CompensateError(CeleryError):
    """Base class of every error raised by celery_compensate."""


class ImproperlyConfigured(CompensateError):
    """A ``compensate_*`` setting is missing or has the wrong type."""


class InvalidSaga(CompensateError, ValueError):
    """A saga cannot be started as given (no steps, an unknown undo task,
    a ``compensate_with`` of the wrong type, arguments that cannot be
    serialized ...).  Raised before anything is stored or published."""


class SagaNotFound(CompensateError, KeyError):
    """No saga with this id exists (never started, or expired)."""

    def __init__(self, saga_id: str) -> None:
        super().__init__(saga_id)
        self.saga_id = saga_id

    def __str__(self) -> str:
        return f'saga {self.saga_id!r} not found (never started, or expired)'


class SagaStoreError(CompensateError):
    """The saga store in Redis failed or returned something unexpected."""


class SagaStoreUnavailable(SagaStoreError, ConnectionError):
    """The saga store's Redis cannot be reached."""


class CompletionNotRecorded(SagaStoreUnavailable):
    """A step completed, and the store stayed unreachable for longer than
    ``compensate_record_retry_timeout``: the completion waits in the
    worker's spool (:mod:`celery_compensate.spool`) until its main process
    records it.

    Attributes:
        saga_id, index: the step.
        token: the token of the refused call (resent as is).
        result: the step's result, as JSON.
    """

    def __init__(self, message: str, saga_id: str, index: int, token: str,
                 result: str) -> None:
        super().__init__(message)
        self.saga_id, self.index = saga_id, index
        self.token, self.result = token, result

    def __reduce__(self) -> tuple[type, tuple[str, str, int, str, str]]:
        # crosses from the pool child to the worker like any task error
        return (type(self), (str(self), self.saga_id, self.index,
                             self.token, self.result))


class CorruptSagaRecord(SagaStoreError):
    """A saga record in Redis cannot be decoded."""


class ResultNotSerializable(CompensateError, TypeError):
    """A step's return value cannot be stored (not JSON, or larger than
    ``compensate_result_max_bytes``).  The step took effect, so the saga
    compensates and the step's undo runs, with a placeholder
    (:func:`celery_compensate.messages.unstored`) as its result."""


class ResultTooLarge(ResultNotSerializable):
    """A step's result is larger than ``compensate_result_max_bytes``."""


class SagaTimeoutError(CompensateError, CeleryTimeoutError, TimeoutError):
    """`SagaResult.wait` ran out of time before the saga reached a final
    state.  Also an instance of the builtin :exc:`TimeoutError` and of
    :exc:`celery.exceptions.TimeoutError`."""


class TaskRefused(CompensateError):
    """A saga record names a task a saga may not run: an undo that is not a
    task registered in the app, or a step or undo that is one of Celery's
    own ``celery.*`` tasks.  It is never sent; a refused undo makes the saga
    ``COMPENSATION_FAILED``, a refused step fails and compensates."""


class SagaFailed(CompensateError):
    """A saga did not complete: raised by :meth:`SagaResult.get`.

    Attributes:
        saga_id: the saga.
        state: its final state.
        reason: why it compensates (the failed step's error, ``lost: ...``
            or ``aborted: ...``).
        failed_step: the index of the step that failed (``None`` when it
            was aborted before any step failed).
        error: that step's error (``None`` likewise).
    """

    def __init__(self, saga_id: str, state: str, reason: str | None,
                 failed_step: int | None, error: str | None) -> None:
        super().__init__(saga_id, state, reason, failed_step, error)
        self.saga_id, self.state, self.reason = saga_id, state, reason
        self.failed_step, self.error = failed_step, error

    def __str__(self) -> str:
        where = ('' if self.failed_step is None
                 else f' (step {self.failed_step} failed)')
        return f'saga {self.saga_id} {self.state}{where}: {self.reason}'


class SagaCompensated(SagaFailed):
    """The saga failed and every completed step was undone."""


class SagaCompensationFailed(SagaFailed):
    """The saga failed and an undo spent its attempts: the saga waits for
    an operator (``celery compensate retry``)."""


class SagaForwardFailed(SagaFailed):
    """A step past the saga's pivot (``compensate_pivot``) spent its
    forward attempts: nothing is undone past a pivot, so the saga waits for
    an operator (``celery compensate retry`` drives it forward)."""


class SagaNotFinished(CompensateError):
    """An operation that needs a finished saga (``forget()``) met one that
    is still running or compensating."""
