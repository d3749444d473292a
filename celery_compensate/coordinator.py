"""The coordinator: turns store outcomes into published tasks, signals and
log lines.

It is the only place that publishes saga tasks, so every forward step and
every undo carries the same headers and task ids.
"""
from __future__ import annotations

import collections
import threading
import time
from contextlib import contextmanager
from typing import (
    TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping,
    Protocol, Sequence, TypeVar,
)

from celery.utils.log import get_logger
from kombu.exceptions import EncodeError
from kombu.utils.json import dumps

from . import signals
from .exceptions import (
    CompletionNotRecorded, ResultNotSerializable, ResultTooLarge,
    SagaStoreUnavailable, TaskRefused,
)
from .messages import (
    DEADLINE, GENERATION, IDEMPOTENCY_KEY, OUTBOX_UNTIL, SAGA_ID, identity,
    label_kwargs, unstored,
)
from .model import (
    FORBIDDEN_OPTIONS, SagaState, StepSpec, TaskIdInfo, idempotency_key,
    parent_of, step_task_id, undo_delay, undo_task_id,
)
from .nesting import SETTLED, Nesting
from .store import Outcome, Reply, SagaStore, UndoDue, new_token

if TYPE_CHECKING:
    from celery import Celery, Task
    from celery.canvas import Signature

    from .settings import Settings

__all__ = ('Coordinator', 'TraceHooks')

logger = get_logger(__name__)

_T = TypeVar('_T')


class TraceHooks(Protocol):
    """What :class:`celery_compensate.tracing.Tracing` offers the layers
    below it, which call it only when tracing is on (so none of them
    imports OpenTelemetry)."""

    def started(self, saga_id: str) -> str | None:
        """A saga is being started: the ``traceparent`` of the span it is
        started in, to keep in its record (``None``: none)."""

    def nested(self, parent_id: str) -> str | None:
        """A nested saga of ``parent_id`` is being started: the
        ``traceparent`` to keep in its record (its parent's span)."""

    def created(self, saga_id: str, trace_parent: str | None) -> None:
        """The saga's record was written (its id was free): what it
        publishes goes to ``trace_parent``'s trace."""

    def publishing(self, saga_id: str,
                   headers: dict[str, Any]) -> ContextManager[None]:
        """Around the publishing of a saga task with ``headers``."""

    def run(self, task: Task[..., Any], info: TaskIdInfo,
            call: Callable[..., Any],
            runner: Callable[[Callable[..., Any]], Any]) -> Any:
        """Run a saga step or undo in a worker: ``runner(call)``, where
        ``call`` runs the body."""


class Coordinator:
    """Advances sagas of one app.

    Arguments:
        app: the Celery app.
        settings: its validated settings.
        store: its saga store.
        tracing: the app's tracing, when it is on.
    """

    def __init__(self, app: Celery, settings: Settings,
                 store: SagaStore, tracing: TraceHooks | None = None) -> None:
        self.app = app
        self.settings = settings
        self.store = store
        self.tracing = tracing
        #: per thread: the tasks an eager run still has to run (see _send)
        self._eager = threading.local()
        self.nesting = Nesting(self)

    # -- publishing -----------------------------------------------------

    @contextmanager
    def eagerly(self) -> Iterator[None]:
        """Run what is sent meanwhile in this thread, in this process
        (``Saga.apply``), as ``task_always_eager`` does."""
        before = getattr(self._eager, 'forced', False)
        self._eager.forced = True
        try:
            yield
        finally:
            self._eager.forced = before

    def _send(self, sig: Signature, task_id: str, headers: dict[str, Any],
              **options: Any) -> None:
        """Publish ``sig`` (see :meth:`_deliver`), in its saga's trace when
        tracing is on."""
        if self.tracing is None:
            self._deliver(sig, task_id, headers, **options)
            return
        with self.tracing.publishing(headers[SAGA_ID], headers):
            self._deliver(sig, task_id, headers, **options)

    def _deliver(self, sig: Signature, task_id: str,
                 headers: dict[str, Any], **options: Any) -> None:
        """Publish ``sig``; in eager mode (``task_always_eager``, or inside
        :meth:`eagerly`) run it in this process instead, iteratively: what
        a task sends while it runs waits in a queue until it returns, so a
        saga of any length runs without recursion, each link after the
        record that made it due, as through a broker."""
        if not (getattr(self._eager, 'forced', False)
                or self.app.conf.task_always_eager):
            sig.apply_async(task_id=task_id, headers=headers, **options)
            return
        pending = getattr(self._eager, 'pending', None)
        if pending is not None:
            pending.append((sig, task_id, headers))
            return
        self._eager.pending = pending = collections.deque(
            [(sig, task_id, headers)])
        try:
            while pending:
                task, ident, head = pending.popleft()
                # a failure is the saga's to handle (recorded by the
                # task's own hooks): never raised out of the run
                task.apply(task_id=ident, headers=head, throw=False)
        finally:
            self._eager.pending = None

    def publish_step(self, saga_id: str, step: StepSpec,
                     args: Sequence[Any], kwargs: Mapping[str, Any],
                     generation: int = 1, outbox: bool = False,
                     countdown: float | None = None) -> None:
        """Publish forward step ``step`` with the given arguments.

        Arguments:
            generation: how many times it has been published, this time
                included (the sweep publishes a step again when its
                publisher died before confirming it, and a step past the
                pivot is published again when it failed).
            outbox: its stage was dispatched into the outbox (by a
                completion): the message says until when the sweep cannot
                have published it again.
            countdown: a retry past the pivot: seconds before it runs, in
                place of the step's own countdown or eta.
        """
        if step.child is not None:
            self.nesting.start(saga_id, step, args, kwargs)
            return
        self.check_task(saga_id, step.describe(), step.call.name)
        options = _allowed(step.call.options)
        now = time.time()
        delay = step.delay
        task_id = step_task_id(saga_id, step.index)
        if countdown is not None:
            # past the pivot: a copy of its own (its task id says which)
            options.pop('eta', None)
            options['countdown'] = delay = countdown
            task_id = step_task_id(saga_id, step.index, generation)
        lease = self.settings.queue_timeout + delay
        ident = identity(saga_id, step.index)
        headers = {**(options.pop('headers', None) or {}), **ident,
                   DEADLINE: round(now + lease, 3)}
        if generation > 1:
            headers[GENERATION] = generation
        elif outbox:
            headers[OUTBOX_UNTIL] = round(
                now + (step.timeout or self.settings.step_timeout)
                + step.delay, 3)
        options['kwargsrepr'] = self._label(ident, kwargs,
                                            options.get('kwargsrepr'))
        self._send(self.app.signature(
            step.call.name, args=tuple(args), kwargs=dict(kwargs)),
            task_id, headers, **options)

    def publish_undo(self, saga_id: str, due: UndoDue,
                     countdown: float | None = None) -> None:
        """Publish one attempt of a step's undo."""
        step = due.step
        assert step.undo is not None
        self.check_task(saga_id, f'the undo of {step.describe()}',
                        step.undo.name, undo=True)
        args, kwargs = step.undo.call_args(due.result, *step.called_with(due.prev))
        options = _allowed(step.undo.options)
        if not step.undo.immutable:
            # called with its step's arguments: what the step hides from
            # monitors (argsrepr/kwargsrepr), its undo hides too
            for key in ('argsrepr', 'kwargsrepr'):
                if key in step.call.options and key not in options:
                    options[key] = step.call.options[key]
        ident = identity(saga_id, step.index, due.attempt)
        headers = {**(options.pop('headers', None) or {}), **ident,
                   IDEMPOTENCY_KEY: idempotency_key(saga_id, step.index)}
        options['kwargsrepr'] = self._label(ident, kwargs,
                                            options.get('kwargsrepr'))
        if self.settings.undo_queue:
            options['queue'] = self.settings.undo_queue
        if countdown:
            options['countdown'] = countdown
        self._send(self.app.signature(step.undo.name, args=args,
                                      kwargs=kwargs),
                   undo_task_id(saga_id, step.index, due.attempt), headers,
                   **options)

    def _label(self, identity: dict[str, Any], kwargs: Mapping[str, Any],
               theirs: str | None) -> str:
        """The ``kwargsrepr`` monitors show: the saga identity first (see
        :mod:`celery_compensate.messages`)."""
        return label_kwargs(identity, kwargs, theirs,
                            self.app.conf.get('task_repr_maxlevels', 3))

    def check_task(self, saga_id: str, what: str, name: Any,
                   undo: bool = False) -> None:
        """Refuse to send a task a saga record names that a saga may not run.

        Specs are read back from Redis, so a forged record must not run
        arbitrary tasks: never one of Celery's own (``celery.*``), and an
        undo only if it is a task registered in this app (a forward step may
        name a task this process does not have: it runs elsewhere).

        Raises:
            TaskRefused: naming the task.
        """
        if (not isinstance(name, str) or name.startswith('celery.')
                or (undo and name not in self.app.tasks)):
            raise TaskRefused(
                f'saga {saga_id}: {what} names {name!r}, which a saga may not '
                'run here: not sent')

    def publish_next_stage(self, saga_id: str, outcome: Outcome) -> None:
        """Publish the stage after a completed one, passing its result on
        like a chain (a parallel stage passes the list of its results)."""
        self.publish_stage(saga_id, outcome.forward, outcome.results)

    def publish_stage(self, saga_id: str, steps: Sequence[StepSpec],
                      prev: Sequence[Any] = (), first: bool = False,
                      generations: Mapping[int, int] | None = None,
                      countdowns: Mapping[int, float] | None = None) -> None:
        """Publish the members of a stage.

        If one cannot be published (Celery already retried), it and the
        members not yet sent fail, so what was sent is compensated once it
        finishes and nothing else starts.

        Arguments:
            prev: the previous stage's results.
            first: the saga's first stage: publishing errors are raised.
            generations: the publish generation of steps sent again.
            countdowns: the backoff of steps retried past the pivot.

        Raises:
            Exception: the publishing error, for the first stage only (the
                caller of ``apply_async`` must hear of it).
        """
        for n, step in enumerate(steps):
            try:
                self.publish_step(saga_id, step, *step.called_with(prev),
                                  generation=(generations or {}).get(
                                      step.index, 1), outbox=not first,
                                  countdown=(countdowns or {}).get(
                                      step.index))
            except Exception as exc:  # noqa: BLE001 - becomes a step failure
                logger.exception('saga %s: could not publish %s',
                                 saga_id, step.describe())
                # past a pivot, a copy never sent is no attempt of its own
                # (no generation): the queue lease sends it again
                for rest in steps[n:]:
                    self.step_failed(TaskIdInfo(saga_id, rest.index, False),
                                     f'publish failed: {exc!r}')
                if first:
                    raise
                return

    # -- reacting to workers ----------------------------------------------

    def step_done(self, info: TaskIdInfo, retval: Any) -> None:
        """A forward step returned: record it, then publish what is next.

        Raises:
            CompletionNotRecorded: the store stayed unreachable for
                ``compensate_record_retry_timeout``.
            ResultNotSerializable: the return value cannot be stored (not
                JSON, or over ``compensate_result_max_bytes``: then
                :exc:`ResultTooLarge`).  The step took effect: it is
                recorded failed with a placeholder result
                (:func:`~celery_compensate.messages.unstored`), the saga
                compensates and the step's undo runs with the placeholder.
        """
        err: ResultNotSerializable | None = None
        try:
            result_json = dumps(retval)
        except (TypeError, ValueError) as exc:
            err = ResultNotSerializable(
                f'saga {info.saga_id}: step {info.index} returned '
                f'{type(retval).__name__} which cannot be stored as JSON: '
                f'{exc}')
            err.__cause__ = exc
        else:
            size = len(result_json.encode())
            if size > self.settings.result_max_bytes:
                err = ResultTooLarge(
                    f'saga {info.saga_id}: step {info.index} returned '
                    f'{size} bytes of JSON, more than '
                    f'compensate_result_max_bytes '
                    f'({self.settings.result_max_bytes})')
        if err is not None:
            why = f'{type(err).__name__}: {err}'
            self.step_failed(info, why, placeholder=dumps(unstored(why)))
            raise err
        token = new_token()
        try:
            outcome = self.persist(
                lambda: self.store.step_done(info.saga_id, info.index,
                                             result_json, token),
                info, 'the completion of step')
        except SagaStoreUnavailable as exc:
            raise CompletionNotRecorded(
                f'saga {info.saga_id}: the completion of step {info.index} '
                f'was not recorded: {exc}', info.saga_id, info.index,
                token, result_json) from exc
        self.apply(info.saga_id, outcome, step=info.index)

    def step_failed(self, info: TaskIdInfo, reason: str,
                    placeholder: str = '',
                    generation: int | None = None,
                    stopped: bool = False) -> Outcome:
        """A forward step failed for good: claim or join compensation;
        past the saga's completed pivot, publish it again after the backoff
        (or, its attempts spent, the saga is ``FORWARD_FAILED``).

        Arguments:
            placeholder: see :meth:`SagaStore.step_failed`.
            generation: the publish generation of the copy that failed
                (default: the one its task id carries, if any).
            stopped: it was revoked: past the pivot, not tried again.
        """
        outcome = self.store.step_failed(
            info.saga_id, info.index, reason, placeholder,
            generation or info.generation or None, stopped)
        if outcome.status is Reply.FORWARD_RETRY:
            self._retry_forward(info.saga_id, outcome, reason)
            return outcome
        if outcome.status is Reply.STALE_COPY:
            logger.info('saga %s: step %d: the failure of an older copy is '
                        'ignored (%s)', info.saga_id, info.index, reason)
            return outcome
        self.apply(info.saga_id, outcome, step=info.index, reason=reason)
        return outcome

    def _retry_forward(self, saga_id: str, outcome: Outcome,
                       reason: str) -> None:
        """Publish again the steps past the pivot that failed or were
        lost, each after its backoff (and what else ``outcome`` has to
        publish again)."""
        for step in outcome.forward:
            if step.index not in outcome.countdowns:
                continue
            logger.warning(
                'saga %s: %s failed past the pivot (%s): it goes forward, '
                'published again in %.2fs', saga_id, step.describe(), reason,
                outcome.countdowns.get(step.index, 0.0))
        self.publish_stage(saga_id, outcome.forward, outcome.results,
                           generations=outcome.generations,
                           countdowns=outcome.countdowns)

    def undo_done(self, info: TaskIdInfo, task_name: str) -> None:
        """An undo attempt succeeded."""
        token = new_token()
        outcome = self.persist(
            lambda: self.store.undo_done(info.saga_id, info.index, token),
            info, 'the undo of step')
        if outcome.status is Reply.UNDONE:
            logger.info('saga %s: step %d compensated by %s',
                        info.saga_id, info.index, task_name)
            signals.step_compensated.send(
                sender=self.app, saga_id=info.saga_id, step=info.index,
                task_name=task_name)
        reason = None
        if (outcome.old_state is SagaState.COMPENSATION_FAILED
                and outcome.new_state is not SagaState.COMPENSATION_FAILED):
            reason = (f'the undo of step {info.index}, counted lost on its '
                      'last attempt, completed after all; compensation '
                      'resumes')
        self.apply(info.saga_id, outcome, step=info.index, reason=reason)

    def undo_failed(self, info: TaskIdInfo, error: BaseException | str,
                    started: bool = True) -> None:
        """An undo attempt failed: schedule the next one or give up.

        Arguments:
            started: whether the failing copy had begun running (a revoked
                or unknown copy had not).
        """
        text = error if isinstance(error, str) else _describe(error)
        countdown = undo_delay(info.attempt, self.settings.undo_retry_backoff,
                               self.settings.undo_retry_backoff_max)
        outcome = self.store.undo_failed(info.saga_id, info.index,
                                         info.attempt, text, started,
                                         countdown)
        if outcome.status is Reply.RETRY:
            due = outcome.undos[0]
            logger.warning(
                'saga %s: undo of step %d failed on attempt %d (%s), '
                'retrying in %.2fs', info.saga_id, info.index, info.attempt,
                text, countdown)
            signals.undo_retry.send(
                sender=self.app, saga_id=info.saga_id, step=info.index,
                attempt=info.attempt, countdown=countdown, error=text)
            self._publish_undos(info.saga_id, [due], countdown)
        elif outcome.status is Reply.FAILED:
            self.failed_for_good(
                info.saga_id, info.index, outcome, text,
                f'undo of step {info.index} failed {info.attempt} times, '
                f'last error: {text}')
            self.settled(info.saga_id, outcome)

    def failed_for_good(self, saga_id: str, step: int, outcome: Outcome,
                         error: str, what: str) -> None:
        """An undo spent its attempts: log the saga's transition to
        COMPENSATION_FAILED (error level, with the reason) and signal it;
        when the saga already was (another undo of the stage), log it
        without a second transition line."""
        if outcome.old_state is SagaState.COMPENSATION_FAILED:
            logger.error('saga %s: %s (the saga was already '
                         'COMPENSATION_FAILED)', saga_id, what)
            return
        logger.error('saga %s: COMPENSATION_FAILED: %s; the remaining undos '
                     'wait for an operator', saga_id, what)
        signals.compensation_failed.send(sender=self.app, saga_id=saga_id,
                                         step=step, error=error)

    # -- recovery and operators -------------------------------------------

    def recover(self, saga_id: str) -> Outcome:
        """Act on a saga whose leases lapsed (the sweep found it due)."""
        outcome = self.store.recover(saga_id)
        if outcome.status is Reply.REPORT:
            logger.warning('saga %s: its report to its parent was not sent '
                           '(its reporter died): sent now', saga_id)
            self.nesting.report(saga_id)
            return outcome
        resent = [s for s in outcome.forward
                  if s.index not in outcome.countdowns]
        if resent:
            logger.warning(
                'saga %s: steps %s were dispatched but their publishing was '
                'never confirmed (the publisher died): published again',
                saga_id, ', '.join(str(s.index) for s in resent))
        if outcome.forward:
            if len(resent) < len(outcome.forward):
                self._retry_forward(saga_id, outcome,
                                    'lost: no live worker renewed its lease')
            else:
                self.publish_stage(saga_id, outcome.forward, outcome.results,
                                   generations=outcome.generations)
        for index in outcome.stopped:
            logger.warning('saga %s: step %d given up: its lease lapsed',
                           saga_id, index)
        for due in outcome.undos:
            logger.info('saga %s: the sweep sends attempt %d of the undo of '
                        'step %d%s', saga_id, due.attempt, due.step.index,
                        f' in {due.countdown:.2f}s' if due.countdown else '')
        first = outcome.stopped[0] if outcome.stopped else None
        self.apply(saga_id, outcome, step=first,
                   reason='lost: no live worker renewed its lease')
        return outcome

    def abort(self, saga_id: str, reason: str) -> Outcome:
        """Stop a running saga: claim compensation and revoke its
        in-flight steps."""
        token = new_token()
        outcome = self.store.abort(saga_id, reason, token)
        if outcome.status is not Reply.ABORTED:
            return outcome
        if outcome.stopped:
            self._revoke(saga_id, [step_task_id(saga_id, i)
                                   for i in outcome.stopped])
        self.apply(saga_id, outcome, reason=reason)
        if outcome.children:
            self.nesting.abort(saga_id, outcome.children, reason)
        return outcome

    def retry(self, saga_id: str) -> Outcome:
        """Re-drive a saga that waits for an operator: a
        COMPENSATION_FAILED one from the undos that failed, a
        FORWARD_FAILED one from the steps past its pivot that failed
        (status ``retried``; ``wrong-state``/``missing`` change nothing)."""
        outcome = self.store.retry(saga_id, new_token())
        if outcome.status is not Reply.RETRIED:
            return outcome
        if outcome.old_state is SagaState.FORWARD_FAILED:
            steps = ', '.join(str(s.index) for s in outcome.forward)
            self.publish_stage(saga_id, outcome.forward, outcome.results,
                               generations=outcome.generations,
                               countdowns=outcome.countdowns)
            self._transition(saga_id, outcome.old_state, outcome.new_state,
                             None, f'retried by an operator (steps '
                                   f'{steps or "none"} sent again)')
            return outcome
        steps = ', '.join(str(d.step.index) for d in outcome.undos)
        self.apply(saga_id, outcome,
                   reason=f'retried by an operator (undos of steps '
                          f'{steps or "none"} sent again)')
        return outcome

    def _revoke(self, saga_id: str, ids: list[str],
                wait: float = 5.0) -> None:
        """Broadcast a revoke (terminate) of ``ids``, waiting at most
        ``wait`` seconds: kombu retries a broadcast for as long as the
        broker is down, and an abort must not hang.  The abort is recorded
        either way; a step the revoke never reaches ends by its lease."""
        def revoke() -> None:
            try:
                self.app.control.revoke(ids, terminate=True)
            except Exception:  # noqa: BLE001 - the abort itself is recorded
                logger.exception('saga %s: could not revoke %s', saga_id, ids)

        thread = threading.Thread(target=revoke, daemon=True,
                                  name='compensate-revoke')
        thread.start()
        thread.join(wait)
        if thread.is_alive():
            logger.warning('saga %s: the revoke of %s is not sent yet (broker '
                           'unreachable); it goes out when the broker is back',
                           saga_id, ids)

    # -- outcome ----------------------------------------------------------

    def apply(self, saga_id: str, outcome: Outcome, step: int | None = None,
              reason: str | None = None) -> None:
        """Publish what ``outcome`` made due and announce its transition."""
        old, new = outcome.old_state, outcome.new_state
        if outcome.status in _IGNORED:
            logger.warning('saga %s: step %s ignored: %s', saga_id, step,
                           _IGNORED[outcome.status])
            return
        if outcome.status is Reply.NEXT:
            self.publish_next_stage(saga_id, outcome)
        # undos first: logging and signal receivers must not delay them
        self._publish_undos(saga_id, outcome.undos)
        if new is not old:
            self._transition(saga_id, old, new, step, reason)
        self.settled(saga_id, outcome)

    def settled(self, saga_id: str, outcome: Outcome) -> None:
        """A nested saga that settled reports to its parent now (its
        record owes the report; if this fails, the sweep sends it)."""
        if outcome.new_state not in SETTLED or parent_of(saga_id) is None:
            return
        try:
            self.nesting.report(saga_id)
        except Exception:  # noqa: BLE001 - the record still owes it
            logger.exception('saga %s: could not report to its parent; the '
                             'sweep sends the report', saga_id)

    def _publish_undos(self, saga_id: str, dues: Sequence[UndoDue],
                       countdown: float | None = None) -> None:
        """Publish undo attempts, then tell the record which were sent, so
        they wait under the queue lease (a publisher that dies in between
        leaves them to the sweep after the undo's lease)."""
        sent = []
        for due in dues:
            if due.step.child is not None:
                # a nested saga's undo is its own compensation, held by it
                # (never sent as a task): the sweep sends it again if this
                # fails
                try:
                    self.nesting.unwind(saga_id, due)
                except Exception:  # noqa: BLE001 - left queued in the record
                    logger.exception('saga %s: could not undo the nested saga '
                                     'of step %d; its undo stays queued',
                                     saga_id, due.step.index)
                continue
            wait = due.countdown or countdown or None
            if self._publish_undo_or_log(saga_id, due, wait):
                sent.append((due.step.index, due.attempt, wait or 0.0))
        if sent:
            try:
                self.store.undo_sent(saga_id, sent)
            except Exception:  # noqa: BLE001 - sent: at worst sent again
                logger.warning('saga %s: could not record that undos %s '
                               'were sent; the sweep may send them again',
                               saga_id, [i for i, _, _ in sent],
                               exc_info=True)

    def _publish_undo_or_log(self, saga_id: str, due: UndoDue,
                             countdown: float | None = None) -> bool:
        """Returns: whether it was published."""
        try:
            self.publish_undo(saga_id, due, countdown=countdown)
            return True
        except TaskRefused as exc:
            self._refuse(saga_id, due, str(exc))
        except _NEVER_SENT as exc:
            # Celery's argument check (the undo's signature changed since
            # the saga started) or the serializer refused it: no later
            # attempt can do better
            self._refuse(saga_id, due, (
                f'saga {saga_id}: attempt {due.attempt} of the undo of '
                f'{due.step.describe()} cannot be sent: {_describe(exc)}'))
        except Exception:  # noqa: BLE001
            # Celery already retried the publish (task_publish_retry): the
            # broker is down.  Spending attempts now would burn the whole
            # budget in milliseconds, so the undo stays queued in the
            # record and the sweep sends it again when its lease lapses.
            logger.exception(
                'saga %s: could not publish attempt %d of the undo of step '
                '%d; it stays queued in the saga record', saga_id,
                due.attempt, due.step.index)
        return False

    def _refuse(self, saga_id: str, due: UndoDue, text: str) -> None:
        """An undo that may not run fails every attempt at once: the saga
        becomes COMPENSATION_FAILED for an operator to look at."""
        attempt = due.attempt
        for _ in range(self.settings.undo_max_attempts):
            outcome = self.store.undo_failed(saga_id, due.step.index, attempt,
                                             text, True)
            if outcome.status is not Reply.RETRY:
                break
            attempt = outcome.undos[0].attempt
        if outcome.status is Reply.FAILED:
            self.failed_for_good(saga_id, due.step.index, outcome, text,
                                  text.removeprefix(f'saga {saga_id}: '))
        else:
            logger.error('%s', text)

    def persist(self, record: Callable[[], _T], info: TaskIdInfo,
                what: str) -> _T:
        """Run ``record`` (a store call made safe to resend by its token)
        until it succeeds or ``compensate_record_retry_timeout`` passes.

        A completed step or undo must not be lost to a brief Redis outage:
        giving up would let the task's failure be recorded instead.

        Raises:
            SagaStoreUnavailable: still unreachable at the deadline.
        """
        deadline = time.monotonic() + self.settings.record_retry_timeout
        delay = 0.1
        while True:
            try:
                return record()
            except SagaStoreUnavailable:
                if time.monotonic() + delay > deadline:
                    logger.error(
                        'saga %s: could not record %s %d: the saga store is '
                        'unreachable', info.saga_id, what, info.index)
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _transition(self, saga_id: str, old: SagaState | None,
                    new: SagaState | None, step: int | None,
                    reason: str | None) -> None:
        """Log the transition (one line) and send its signals."""
        send = {'sender': self.app, 'saga_id': saga_id}
        if new is SagaState.FORWARD_FAILED:
            logger.error('saga %s: FORWARD_FAILED: step %s failed past the '
                         'pivot and spent its attempts, last error: %s; it '
                         'waits for an operator (retry drives it forward)',
                         saga_id, step, reason)
            signals.saga_forward_failed.send(step=step, error=reason, **send)
            return
        if old is SagaState.FORWARD_FAILED and new is SagaState.RUNNING:
            logger.warning('saga %s: RUNNING again: %s', saga_id,
                           reason or f'step {step} completed after all')
            return
        if new is SagaState.COMPENSATION_FAILED:
            # only the sweep gets here (undo_failed logs its own)
            logger.error('saga %s: COMPENSATION_FAILED: an undo was lost with '
                         'its worker on its last attempt; the remaining undos '
                         'wait for an operator', saga_id)
            signals.compensation_failed.send(step=step, error=reason, **send)
            return
        if new is SagaState.COMPLETED:
            logger.info('saga %s: COMPLETED', saga_id)
            signals.saga_completed.send(**send)
            return
        if old is SagaState.RUNNING:
            signals.compensation_started.send(step=step, reason=reason, **send)
        # an abort names no failed step, only its reason
        why = reason if step is None else f'step {step} failed: {reason}'
        if new is SagaState.COMPENSATING:
            if old is SagaState.RUNNING:
                logger.warning('saga %s: COMPENSATING: %s', saga_id, why)
            else:
                # an operator's retry, or a step that completed after its
                # stage had been compensated (undone out of order)
                logger.warning('saga %s: COMPENSATING again: %s', saga_id,
                               reason or f'step {step} completed late and is '
                               'undone')
        elif new is SagaState.COMPENSATED:
            if old is SagaState.RUNNING:
                logger.warning('saga %s: COMPENSATED: %s; nothing to undo',
                               saga_id, why)
            else:
                # the failure was reported when compensation began
                logger.info('saga %s: COMPENSATED', saga_id)
            signals.saga_compensated.send(**send)


#: Publishing errors no later attempt can escape: Celery's argument check
#: (``Task.typing``) and the serializer.
_NEVER_SENT = (TypeError, EncodeError)

#: Replies that mean a notification about a step is ignored, and why.
_IGNORED = {
    Reply.MISSING: 'no such saga in the store (expired or never started)',
    Reply.UNKNOWN_STEP: 'the saga has no such step',
    Reply.NOT_DISPATCHED: 'its stage was never dispatched',
}


def _allowed(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in FORBIDDEN_OPTIONS}


def _describe(exc: BaseException) -> str:
    return f'{type(exc).__name__}: {exc}'[:2000]

