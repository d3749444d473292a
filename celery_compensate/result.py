"""``SagaResult``: the handle of a saga, rebuildable from its id anywhere."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery import current_app

from celery.utils.log import get_logger

from .appstate import get_state
from .exceptions import (
    InvalidSaga, SagaCompensated, SagaCompensationFailed, SagaFailed,
    SagaForwardFailed, SagaNotFinished, SagaNotFound, SagaTimeoutError,
)
from .model import FINAL_STATES, SagaState, parent_of, validate_saga_id
from .store import Reply

if TYPE_CHECKING:
    from celery import Celery

    from .store import SagaRecord, SagaStore, StepRecord

__all__ = ('SagaResult',)

logger = get_logger(__name__)

#: what a failed saga's result is, by its state
_FAILURES: dict[SagaState, type[SagaFailed]] = {
    SagaState.COMPENSATED: SagaCompensated,
    SagaState.COMPENSATION_FAILED: SagaCompensationFailed,
    SagaState.FORWARD_FAILED: SagaForwardFailed,
}


class SagaResult:
    """The state of one saga, read from the saga store; it reads like
    Celery's :class:`~celery.result.AsyncResult` (``get``, ``ready``,
    ``successful``, ``failed``, ``result``, ``status``, ``date_done``,
    ``traceback``, ``forget``).

    Arguments:
        id: the saga id.
        app: the app the saga belongs to (default: the current app).
    Raises:
        InvalidSaga: ``id`` is not a valid saga id (it names it).
    """

    def __init__(self, id: str, app: Celery | None = None) -> None:
        try:
            self.id = validate_saga_id(id, nested=True)
        except ValueError as exc:
            raise InvalidSaga(str(exc)) from None
        self.app = app or current_app
        #: the result of the task before it, when the saga is a chain's
        #: last link (set by Celery's chain, as on ``AsyncResult``)
        self.parent: Any = None

    @property
    def task_id(self) -> str:
        """The saga id (the name ``AsyncResult`` gives its id)."""
        return self.id

    def __repr__(self) -> str:
        return f'<SagaResult: {self.id}>'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SagaResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def children(self) -> list[SagaResult]:
        """The handles of the sagas nested in this one (its steps that are
        sagas), in step order; each has an id of the form
        ``<this id>~<step index>`` and a record of its own.  A child not
        started yet reads as not found.

        Raises:
            SagaNotFound: no saga with this id.
        """
        return [SagaResult(step.child, app=self.app)
                for step in self.info().steps if step.child is not None]

    @property
    def parent_saga(self) -> SagaResult | None:
        """The saga this one is nested in (``None``: an outermost saga).
        (``parent`` is what Celery's chain sets on a link's result.)"""
        up = parent_of(self.id)
        return None if up is None else SagaResult(up[0], app=self.app)

    @property
    def _store(self) -> SagaStore:
        return get_state(self.app).store

    @property
    def state(self) -> SagaState:
        """The current state.

        Raises:
            SagaNotFound: no saga with this id (never started, or expired).
        """
        return self._store.get_state(self.id)

    @property
    def status(self) -> SagaState:
        """The current state (as :attr:`state`; the name Celery's results
        use)."""
        return self.state

    def ready(self) -> bool:
        """Whether the saga reached a final state."""
        return self.state in FINAL_STATES

    def successful(self) -> bool:
        """Whether the saga is ``COMPLETED``."""
        return self.state is SagaState.COMPLETED

    def failed(self) -> bool:
        """Whether the saga failed: ``COMPENSATED``,
        ``COMPENSATION_FAILED`` or ``FORWARD_FAILED``."""
        return self.state in _FAILURES

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.5) -> Any:
        """Wait until the saga is final and return what it produced: the
        result of its last stage (a list, in step order, when that stage
        runs in parallel).

        Arguments:
            timeout: seconds to wait at most (``None``: forever).
            propagate: raise when the saga failed (else return the
                exception).
            interval: the longest pause between two reads of the store.
        Raises:
            SagaCompensated: the saga failed and was compensated.
            SagaCompensationFailed: the saga failed and an undo spent its
                attempts (it waits for an operator).
            SagaForwardFailed: a step past the pivot spent its attempts
                (it waits for an operator).
            SagaTimeoutError: time ran out (a saga not started yet is
                waited for, as a ``PENDING`` task is).
        """
        self._poll(timeout, min(0.05, interval), interval)
        outcome = self.result
        if isinstance(outcome, SagaFailed) and propagate:
            raise outcome
        return outcome

    @property
    def result(self) -> Any:
        """What :meth:`get` returns without waiting: the last stage's
        result once ``COMPLETED``, the :exc:`SagaCompensated`,
        :exc:`SagaCompensationFailed` or :exc:`SagaForwardFailed` of a
        failed saga, else ``None``."""
        record = self.info()
        if record.state is SagaState.COMPLETED:
            last = max(step.stage for step in record.steps)
            results = [step.result for step in record.steps
                       if step.stage == last]
            return results[0] if len(results) == 1 else results
        if record.state in _FAILURES:
            error = (record.steps[record.failed_step].failure
                     if record.failed_step is not None else None)
            cls = _FAILURES[record.state]
            return cls(self.id, record.state.value, record.reason,
                       record.failed_step, error)
        return None

    @property
    def date_done(self) -> datetime | None:
        """When the saga became final (UTC), or ``None``."""
        ended = self.info().ended
        return (None if ended is None
                else datetime.fromtimestamp(ended, tz=timezone.utc))

    @property
    def traceback(self) -> str | None:
        """The failed step's error (``<Exception>: <message>``; the store
        keeps no Python traceback), or ``None``."""
        record = self.info()
        if record.failed_step is None:
            return None
        return record.steps[record.failed_step].failure

    def forget(self) -> None:
        """Delete the finished saga's record (and its index entries) now
        instead of when it expires.  Forgetting a ``COMPENSATION_FAILED``
        saga gives up on its failed undos.

        Raises:
            SagaNotFinished: it is still ``RUNNING`` or ``COMPENSATING``, or
                it is a nested saga whose outermost saga has not ended.
            SagaNotFound: no saga with this id.
        """
        status, state = self._store.forget(self.id)
        if status is Reply.MISSING:
            raise SagaNotFound(self.id)
        if status is Reply.NOT_FINISHED and state in FINAL_STATES:
            raise SagaNotFinished(
                f'saga {self.id} is a nested saga: it is kept until its '
                f'outermost saga ends (its parent may still undo it), then '
                f'expires with it')
        if status is Reply.NOT_FINISHED:
            raise SagaNotFinished(
                f'saga {self.id} is {state.value if state else "?"}: only a '
                'finished saga can be forgotten')

    def info(self) -> SagaRecord:
        """The whole record: state, failed step, and every step's state,
        result and undo attempts.

        Raises:
            SagaNotFound: no saga with this id.
            CorruptSagaRecord: the record cannot be decoded.
        """
        return self._store.read(self.id)

    @property
    def steps(self) -> list[StepRecord]:
        """Each step's task, task id, state, timings and result, and its
        undo's state, attempts and last error, in plan order.

        Raises:
            SagaNotFound: no saga with this id.
        """
        return self.info().steps

    def abort(self, reason: str = 'by an operator') -> bool:
        """Stop a running saga and compensate what completed.

        Compensation starts and its in-flight steps are revoked with
        ``terminate=True``: one no worker has taken yet is given up at once;
        one a worker holds settles when it ends (killed, or undone first if
        it completes anyway, or by its lease if its worker is gone).  The
        undos of the completed steps run in reverse order as after a
        failure.

        Arguments:
            reason: recorded as the saga's reason (``aborted: <reason>``).
        Returns:
            bool: ``True`` if the saga was running and is now compensating;
            ``False`` if it was not running, or its pivot
            (``compensate_pivot``) completed so it can only go forward
            (nothing changed; a warning says which).
        Raises:
            SagaNotFound: no saga with this id.
        """
        outcome = get_state(self.app).coordinator.abort(
            self.id, f'aborted: {reason}')
        if outcome.status is Reply.MISSING:
            raise SagaNotFound(self.id)
        if outcome.status is Reply.NOT_RUNNING:
            logger.warning('saga %s: not aborted: it is %s, not RUNNING',
                           self.id, outcome.old_state)
            return False
        if outcome.status is Reply.PAST_PIVOT:
            logger.warning('saga %s: not aborted: its pivot completed, so it '
                           'can only go forward', self.id)
            return False
        return True

    def retry(self) -> bool:
        """Re-drive a saga that waits for an operator.

        ``COMPENSATION_FAILED``: every undo that spent its attempts is sent
        again with a fresh budget of ``compensate_undo_max_attempts`` (its
        next attempt number, so a new task id); undos that finished are
        never repeated, and compensation then carries on backwards as
        before.

        ``FORWARD_FAILED``: every step past the pivot that spent its
        attempts is published again with a fresh budget of
        ``compensate_forward_max_attempts``, and the saga is ``RUNNING``
        again, forward.

        Returns:
            bool: ``True`` if the saga was ``COMPENSATION_FAILED`` (now
            ``COMPENSATING``) or ``FORWARD_FAILED`` (now ``RUNNING``);
            ``False`` if it was in another state (nothing changed; a
            warning names its state).
        Raises:
            SagaNotFound: no saga with this id.
        """
        outcome = get_state(self.app).coordinator.retry(self.id)
        if outcome.status is Reply.MISSING:
            raise SagaNotFound(self.id)
        if outcome.status is Reply.WRONG_STATE:
            logger.warning('saga %s: not retried: it is %s, not '
                           'COMPENSATION_FAILED or FORWARD_FAILED', self.id,
                           outcome.old_state)
            return False
        return True

    def wait(self, timeout: float | None = None,
             interval: float = 0.05) -> SagaState:
        """Block until the saga is ``COMPLETED``, ``COMPENSATED`` or
        ``COMPENSATION_FAILED`` and return that state.

        Arguments:
            timeout: seconds to wait at most (``None``: forever).
            interval: seconds between polls (doubling up to 0.5).

        A saga not started yet (frozen, or a link whose parent has not
        run) is waited for, as a ``PENDING`` task is.

        Raises:
            SagaTimeoutError: (a :exc:`TimeoutError`) time ran out.
        """
        return self._poll(timeout, interval, max(interval, 0.5))

    def _poll(self, timeout: float | None, interval: float,
              longest: float) -> SagaState:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                state: SagaState | None = self.state
            except SagaNotFound:
                # not started yet (frozen, or a link whose parent has not
                # run): waited for, as a PENDING task is
                state = None
            if state in FINAL_STATES:
                return state
            if deadline is not None and time.monotonic() >= deadline:
                raise SagaTimeoutError(
                    f'saga {self.id} still '
                    f'{state.value if state else "not started"} after '
                    f'{timeout}s')
            time.sleep(interval)
            interval = min(interval * 2, longest)
