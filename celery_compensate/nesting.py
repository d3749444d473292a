"""Nested sagas: the hand-offs between a parent saga and the child saga
that is one of its steps.

A child is a saga of its own (its id ``<parent>~<step>``, its own record,
in its root's shard), started in place of publishing a task, and undone in
place of publishing an undo:

- **start**: when the parent's stage is published, the child is stored
  with its step in the parent held by it, in one command (``start.lua``),
  then its first stage is published.
- **report**: when the child settles (completed, compensated, or
  COMPENSATION_FAILED) its record owes the parent a report (``rp``); the
  process that settled it sends the parent's own command (step done, step
  failed, undo done, undo failed) with the report's token, then clears it.
  If that process dies in between, the sweep finds the report overdue and
  sends it again: the parent's command answers a resend like the first
  call.
- **unwind**: the parent's undo of a completed child is the child's own
  compensation, from its last stage (``unwind.lua``); on an operator's
  retry of the parent it re-drives a COMPENSATION_FAILED child.
"""
from __future__ import annotations

from typing import (
    TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, TypeVar,
)

from celery.utils.log import get_logger
from kombu.utils.json import dumps

from . import signals
from .messages import unstored
from .model import SagaState, StepSpec, TaskIdInfo, child_saga_id, parent_of
from .store import Outcome, Reply, SagaStore, UndoDue, new_token

if TYPE_CHECKING:
    from celery import Celery

__all__ = ('Nesting', 'Advancer')

_T = TypeVar('_T')

logger = get_logger(__name__)

#: states a nested saga reports to its parent when it enters them
SETTLED = frozenset({SagaState.COMPLETED, SagaState.COMPENSATED,
                     SagaState.COMPENSATION_FAILED})


class Advancer(Protocol):
    """What nesting needs of the coordinator above it (which owns the
    publishing, the logs and the signals of every transition)."""

    app: Celery
    store: SagaStore
    tracing: Any

    def publish_stage(self, saga_id: str, steps: Sequence[StepSpec],
                      prev: Sequence[Any] = ()) -> None: ...

    def apply(self, saga_id: str, outcome: Outcome, step: int | None = None,
              reason: str | None = None) -> None: ...

    def abort(self, saga_id: str, reason: str) -> Outcome: ...

    def failed_for_good(self, saga_id: str, step: int, outcome: Outcome,
                        error: str, what: str) -> None: ...

    def settled(self, saga_id: str, outcome: Outcome) -> None: ...

    def persist(self, record: Callable[[], _T], info: TaskIdInfo,
                what: str) -> _T: ...


class Nesting:
    """Starts, reports and unwinds the nested sagas of one app.

    Arguments:
        coordinator: the app's coordinator (which publishes what each
            hand-off makes due).
    """

    def __init__(self, coordinator: Advancer) -> None:
        self.coordinator = coordinator
        self.store = coordinator.store

    def start(self, saga_id: str, step: StepSpec, args: Sequence[Any],
              kwargs: Mapping[str, Any]) -> None:
        """Start the child saga that is ``step`` of ``saga_id``, called
        with ``args`` and ``kwargs`` (as ``apply_async(args, kwargs)``).

        Raises:
            SagaStoreUnavailable: Redis is unreachable (the caller records
                the step failed, as for a publishing error).
        """
        assert step.child is not None
        c = self.coordinator
        child_id = child_saga_id(saga_id, step.index)
        plan = step.child.with_arguments(args, kwargs)
        tracing = c.tracing
        trace_parent = tracing.nested(saga_id) if tracing else None
        token = new_token()
        # resent with its token while Redis is briefly away: a start whose
        # reply was lost answers ``created`` again, so the step is not
        # taken for failed while its child runs
        reply = c.persist(lambda: self.store.start(
            child_id, plan, None, trace_parent, parent=(saga_id, step.index),
            token=token), TaskIdInfo(saga_id, step.index, False),
            'the start of the nested saga of step')
        if reply is Reply.EXISTS:
            # a resent start (the sweep published the step again): the
            # child runs already, and its own outbox covers its first stage
            logger.info('saga %s: nested saga %s (step %d) was started '
                        'already', saga_id, child_id, step.index)
            return
        if reply in (Reply.ORPHAN, Reply.BUSY):
            # ORPHAN: the sweep published the step again (its publisher
            # died) after the saga stopped running: settled now, not after
            # a queue lease (a step settled already ignores this)
            why = ('not started: its saga no longer runs'
                   if reply is Reply.ORPHAN else
                   f'not started: a nested saga {child_id} left by an '
                   f'earlier saga with the id {saga_id} is still at work')
            logger.info('saga %s: nested saga %s (step %d) %s', saga_id,
                        child_id, step.index, why)
            outcome = self.store.step_failed(saga_id, step.index, why)
            c.apply(saga_id, outcome, step=step.index, reason=why)
            return
        if tracing:
            tracing.created(child_id, trace_parent)
        logger.info('saga %s: RUNNING: started with %d steps in %d stages, '
                    'as step %d of saga %s', child_id, len(plan),
                    len(plan.stages), step.index, saga_id)
        signals.saga_started.send(sender=c.app, saga_id=child_id,
                                  steps=len(plan))
        # not the outermost first stage: a publishing error fails the
        # child's step (and so the child), it is not raised
        c.publish_stage(child_id, plan.stages[0])
        try:
            # published: out of the outbox, under the queue lease (a
            # backlog longer than the step lease must not make the sweep
            # publish it again); if this fails, the sweep may, once
            self.store.confirm_first_stage(child_id)
        except Exception:  # noqa: BLE001 - the outbox covers it
            logger.warning('saga %s: could not confirm its first stage was '
                           'published; the sweep may publish it again',
                           child_id, exc_info=True)

    def unwind(self, saga_id: str, due: UndoDue) -> None:
        """Undo the child that is ``due.step`` of ``saga_id`` as a unit:
        its own compensation (see ``lua/unwind.lua``).

        Raises:
            SagaStoreUnavailable: Redis is unreachable (the parent's undo
                stays queued; the sweep sends it again).
        """
        self._unwind(saga_id, due.step.index, due.attempt)

    def _unwind(self, saga_id: str, index: int, attempt: int) -> None:
        c = self.coordinator
        child_id = child_saga_id(saga_id, index)
        outcome = self.store.unwind(saga_id, index, attempt, new_token())
        status = outcome.status
        if status is Reply.GONE:
            # never started (refused as an orphan, or never published):
            # nothing of it took effect
            logger.info('saga %s: nested saga %s never started: nothing to '
                        'undo', saga_id, child_id)
            self._tell(saga_id, index, self.store.undo_done(
                saga_id, index, new_token()),
                f'nested saga {child_id} never started')
            return
        if status is Reply.STALE:
            logger.info('saga %s: the undo of nested saga %s (attempt %d) '
                        'is not in flight: nothing done', saga_id, child_id,
                        attempt)
            return
        if status is Reply.WAITING and outcome.old_state is SagaState.RUNNING:
            # still going forward (its start was taken for failed: the
            # reply was lost): stop it, it reports once it compensated
            c.abort(child_id, f'its parent {saga_id} undoes it')
            return
        if status is Reply.UNWINDING:
            if outcome.old_state is SagaState.COMPLETED:
                logger.warning('saga %s: COMPENSATING: undone as a unit (step '
                               '%d of saga %s is compensated)', child_id,
                               index, saga_id)
                signals.compensation_started.send(
                    sender=c.app, saga_id=child_id, step=None,
                    reason='undone as a unit: its parent compensates')
            c.apply(child_id, outcome, reason='undone as a unit')
        elif status is Reply.REDRIVEN:
            logger.warning('saga %s: COMPENSATING again: its parent %s was '
                           'retried by an operator', child_id, saga_id)
            c.apply(child_id, outcome)
        elif status is Reply.REPORT:
            self.report(child_id)

    def report(self, child_id: str) -> None:
        """Tell the parent of ``child_id`` what the child settled in, with
        the report's token (a resend is answered like the first call),
        then clear the report.  Nothing when none is owed."""
        parent = parent_of(child_id)
        if parent is None:
            return
        rep = self.store.report(child_id)
        if rep is None or rep.token is None or rep.index is None:
            return
        c = self.coordinator
        saga_id, index = parent
        if not rep.mine:
            logger.warning('saga %s: not reported: its parent %s is not the '
                           'saga that started it (an earlier saga with that '
                           'id)', child_id, saga_id)
            self.store.reported(child_id, rep.token)
            return
        if rep.state not in SETTLED:
            # compensating again (re-driven, or undone as a unit): the
            # parent acted on this report already
            self.store.reported(child_id, rep.token)
            return
        if rep.state is SagaState.COMPLETED and rep.undo_for is not None:
            # its parent undoes it already (it had taken the child's start
            # for failed): it completed meanwhile, so it is undone now.
            # The report is cleared only after (unwind clears it itself):
            # if this dies first, the sweep reports it again
            self._unwind(saga_id, index, rep.undo_for)
            self.store.reported(child_id, rep.token)
            return
        if rep.state is SagaState.COMPLETED:
            result = rep.results[0] if len(rep.results) == 1 else rep.results
            result_json = dumps(result)
            size = len(result_json.encode())
            limit = self.store.settings.result_max_bytes
            if size > limit:
                # its last stage's results together are too large for the
                # parent's record: as a step whose result cannot be stored,
                # it took effect, fails, and is undone (as a unit)
                why = (f'ResultTooLarge: nested saga {child_id} completed '
                       f'with {size} bytes of JSON (its last stage\'s '
                       f'results), more than compensate_result_max_bytes '
                       f'({limit})')
                outcome = self.store.step_failed(
                    saga_id, index, why, dumps(unstored(why)),
                    token=rep.token)
                c.apply(saga_id, outcome, step=index, reason=why)
            else:
                outcome = self.store.step_done(saga_id, index, result_json,
                                               rep.token)
                c.apply(saga_id, outcome, step=index)
        elif rep.undo_for is None:
            why = (f'nested saga {child_id} is {rep.state}'
                   + (f': {rep.reason}' if rep.reason else ''))
            outcome = self.store.step_failed(saga_id, index, why,
                                             token=rep.token)
            c.apply(saga_id, outcome, step=index, reason=why)
        elif rep.state is SagaState.COMPENSATED:
            self._tell(saga_id, index, self.store.undo_done(
                saga_id, index, rep.token),
                f'nested saga {child_id} compensated')
        else:
            why = (f'nested saga {child_id} is COMPENSATION_FAILED (retry '
                   f'{saga_id} to re-drive it)')
            outcome = self.store.undo_failed(
                saga_id, index, rep.undo_for, why, started=True, final=True,
                token=rep.token, nested=True)
            if outcome.status is Reply.FAILED:
                c.failed_for_good(saga_id, index, outcome, why, why)
                c.settled(saga_id, outcome)
        self.store.reported(child_id, rep.token)

    def _tell(self, saga_id: str, index: int, outcome: Outcome,
              how: str) -> None:
        """The parent's undo of step ``index`` is done: announce it."""
        c = self.coordinator
        if outcome.status is Reply.UNDONE:
            logger.info('saga %s: step %d compensated (%s)', saga_id, index,
                        how)
            signals.step_compensated.send(
                sender=c.app, saga_id=saga_id, step=index,
                task_name=child_saga_id(saga_id, index))
        c.apply(saga_id, outcome, step=index)

    def abort(self, saga_id: str, indices: Sequence[int],
              reason: str) -> None:
        """The parent was aborted: abort its running children (each step
        settles when its child reports)."""
        for index in indices:
            child_id = child_saga_id(saga_id, index)
            outcome = self.coordinator.abort(
                child_id, f'its parent {saga_id} was aborted: {reason}')
            logger.info('saga %s: nested saga %s: abort %s', saga_id,
                        child_id, outcome.status)
