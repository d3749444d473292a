"""``SagaResult``: the handle of a saga, rebuildable from its id anywhere."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from celery import current_app

from celery.utils.log import get_logger

from .appstate import get_state
from .exceptions import SagaNotFound, SagaTimeoutError
from .model import FINAL_STATES, SagaState, validate_saga_id
from .store import Reply

if TYPE_CHECKING:
    from celery import Celery

    from .store import SagaRecord, SagaStore, StepRecord

__all__ = ('SagaResult',)

logger = get_logger(__name__)


class SagaResult:
    """The state of one saga, read from the saga store.

    Arguments:
        id: the saga id.
        app: the app the saga belongs to (default: the current app).
    """

    def __init__(self, id: str, app: Celery | None = None) -> None:
        self.id = validate_saga_id(id)
        self.app = app or current_app

    def __repr__(self) -> str:
        return f'<SagaResult: {self.id}>'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SagaResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

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

    def ready(self) -> bool:
        """Whether the saga reached a final state."""
        return self.state in FINAL_STATES

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
            ``False`` if it was not running (nothing changed; a warning
            names its state).
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
        return True

    def retry(self) -> bool:
        """Re-drive a ``COMPENSATION_FAILED`` saga from the undo that failed.

        Every undo that spent its attempts is sent again with a fresh
        budget of ``compensate_undo_max_attempts`` (its next attempt
        number, so a new task id); undos that finished are never repeated,
        and compensation then carries on backwards as before.

        Returns:
            bool: ``True`` if the saga was ``COMPENSATION_FAILED`` and is
            ``COMPENSATING`` again; ``False`` if it was in another state
            (nothing changed; a warning names its state).
        Raises:
            SagaNotFound: no saga with this id.
        """
        outcome = get_state(self.app).coordinator.retry(self.id)
        if outcome.status is Reply.MISSING:
            raise SagaNotFound(self.id)
        if outcome.status is Reply.WRONG_STATE:
            logger.warning('saga %s: not retried: it is %s, not '
                           'COMPENSATION_FAILED', self.id, outcome.old_state)
            return False
        return True

    def wait(self, timeout: float | None = None,
             interval: float = 0.05) -> SagaState:
        """Block until the saga is ``COMPLETED``, ``COMPENSATED`` or
        ``COMPENSATION_FAILED`` and return that state.

        Arguments:
            timeout: seconds to wait at most (``None``: forever).
            interval: seconds between polls (doubling up to 0.5).

        Raises:
            SagaTimeoutError: (a :exc:`TimeoutError`) time ran out.
            SagaNotFound: no saga with this id.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.state
            if state in FINAL_STATES:
                return state
            if deadline is not None and time.monotonic() >= deadline:
                raise SagaTimeoutError(
                    f'saga {self.id} still {state.value} after {timeout}s')
            time.sleep(interval)
            interval = min(interval * 2, 0.5)
