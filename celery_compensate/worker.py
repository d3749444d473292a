"""Worker-side hooks: the task ``__call__`` wrapper and the failure signals.

The wrapper records a completed step *inside* the task call, before Celery
publishes anything else (``celery/app/trace.py`` publishes the next chain
link before ``on_success``/``task_success``).  The signal handlers catch the
failures that happen outside the call: hard time limits, lost pool
children, ``Reject`` and revokes, which Celery reports from the worker's
main process with only the task id.

Task options owned here (ordinary ``@app.task(...)`` options, so any base
class works):

- ``compensate_with``: the undo (a task, a task name or a signature);
- ``compensate_on_failure``: also undo the step when it fails itself (its
  undo then gets ``None`` as the result);
- ``compensate_timeout``: seconds the step (or, on an undo task, the undo)
  may go without a live worker holding it before the recovery sweep acts
  (default ``compensate_step_timeout``);
- ``compensate_pivot``: the step is the saga's point of no return (read
  by the canvas when the saga is built).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from celery import signals as celery_signals
from celery.exceptions import Ignore, Reject, Retry
from celery.app.task import Task as BaseTask
from celery.utils.objects import mro_lookup
from celery.utils.log import get_logger

from .appstate import find_state
from .exceptions import (
    CompletionNotRecorded, ResultNotSerializable, SagaStoreUnavailable,
)
from .messages import DEADLINE, GENERATION, OUTBOX_UNTIL, SAGA_ID
from .model import StepState, TaskIdInfo, parse_task_id
from .spool import Spool, Unrecorded
from .store import Reply, new_token

if TYPE_CHECKING:
    from typing import TypeAlias

    from celery import Celery, Task

    from .appstate import AppState

    # any task: the wrapper passes its arguments and result through
    AnyTask: TypeAlias = Task[..., Any]

__all__ = ('CallAnnotation', 'wrap_task_class',
           'wrap_app_tasks', 'connect_signals')

logger = get_logger(__name__)

def wrap_task_class(cls: type[AnyTask]) -> None:
    """Wrap ``cls.__call__`` so saga steps and undos are recorded.

    Idempotent per class; a subclass whose own ``__call__`` runs after its
    base's gets a wrapper of its own (the inner one then steps aside).
    A class without a ``__call__`` of its own has ``run`` called directly,
    as Celery's tracer does, so ``self.request`` is the worker's request
    object itself.  Tasks not sent by a saga pay a few attribute lookups.
    """
    if getattr(cls.__dict__.get('__call__'), '_compensate_hook', False):
        return
    orig: Callable[..., Any] = cls.__call__
    # what celery.app.trace.task_has_custom() tells the tracer
    custom = mro_lookup(cls, '__call__', stop={BaseTask, object},
                        monkey_patched=['celery.app.task']) is not None

    def __call__(self: AnyTask, *args: Any, **kwargs: Any) -> Any:
        request = self.request_stack.top
        if request is None or getattr(request, '_compensate_entered', False):
            # called directly, or nested inside this task's own call
            return orig(self, *args, **kwargs)
        # our marker on the request (a Context, or the worker's Request)
        request._compensate_entered = True  # type: ignore[attr-defined]
        info = parse_task_id(request.id)
        state = find_state(self.app)
        call = orig if custom else _call_run
        if info is None or state is None:
            return call(self, *args, **kwargs)
        if getattr(request, 'is_eager', False):
            # run in the calling process: the saga's headers are not on the
            # request as a worker puts them; the task reads them there
            for key, value in (getattr(request, 'headers', None) or {}
                               ).items():
                if key.startswith('compensate_'):
                    setattr(request, key, value)
        run = _run_undo if info.is_undo else _run_step
        if state.tracing is not None:
            return state.tracing.run(self, info, call, lambda body: run(
                state, self, body, info, args, kwargs))
        return run(state, self, call, info, args, kwargs)

    __call__._compensate_hook = True  # type: ignore[attr-defined]
    __call__.__wrapped__ = orig  # type: ignore[attr-defined]
    cls.__call__ = __call__  # type: ignore[method-assign]


def wrap_app_tasks(app: Celery) -> None:
    """Wrap every task class of ``app`` that is not (or no longer) wrapped:
    a user annotation around ``__call__`` or configuration loaded after
    ``install()`` can replace the wrapper Celery put on at bind time."""
    for task in list(app.tasks.values()):
        wrap_task_class(type(task))


def _call_run(task: AnyTask, *args: Any, **kwargs: Any) -> Any:
    return task.run(*args, **kwargs)


class CallAnnotation:
    """A ``task_annotations`` entry that wraps every task class of the app
    when Celery binds it, whatever its base class."""

    def annotate(self, task: type[AnyTask]) -> None:
        wrap_task_class(task)
        return None

    def annotate_any(self) -> None:
        return None


def _run_step(state: AppState, task: AnyTask, orig: Callable[..., Any],
              info: TaskIdInfo, args: Any, kwargs: Any) -> Any:
    why, generation = _may_be_settled(state, task.request)
    if why:
        # a copy that can have a twin the record settled or superseded:
        # run the body only if the record expects this copy (a round trip
        # paid by such messages only)
        try:
            code, result, current = state.store.step_status(
                info.saga_id, info.index)
        except SagaStoreUnavailable as exc:
            # cannot tell whether the step already ended: do not run the
            # body now, and do not fail the step either
            raise _retry_later(state, task, exc) from exc
        if code in (StepState.DONE, StepState.FAILED):
            logger.info('saga %s: step %d not run again (%s): it is already '
                        '%s', info.saga_id, info.index, why,
                        'done' if code == StepState.DONE else 'given up')
            return result
        if generation and generation < current:
            logger.info('saga %s: step %d not run (%s): it was published '
                        'again; this copy is older', info.saga_id,
                        info.index, why)
            return None
    try:
        retval = orig(task, *args, **kwargs)
    except (Retry, Ignore):
        # a retry is not a failure; Ignore leaves the step to the sweep
        raise
    except Reject as exc:
        # celery-types omits the attributes Reject sets
        if not exc.requeue:  # type: ignore[attr-defined]
            _guarded(state.coordinator.step_failed, info,
                     f'rejected: {exc.reason!r}',  # type: ignore[attr-defined]
                     generation=generation or None)
        raise
    except Exception as exc:
        _guarded(state.coordinator.step_failed, info, _describe(exc),
                 generation=generation or None)
        _mark_handled(exc)
        raise
    try:
        state.coordinator.step_done(info, retval)
    except CompletionNotRecorded as exc:
        # completed: its worker records it once the store is back (and
        # keeps it held meanwhile); its failure must not be recorded
        _spool(state, task, exc)
        _mark_handled(exc)
        raise
    except (SagaStoreUnavailable, ResultNotSerializable) as exc:
        # already recorded as failed: its failure must not be recorded
        # again
        _mark_handled(exc)
        raise
    return retval


def _spool(state: AppState, task: AnyTask, exc: CompletionNotRecorded) -> None:
    """Leave an unrecorded completion to the worker's main process."""
    spool = Spool.of_worker(state.settings.key_prefix, state.hostname)
    if spool is None:
        logger.error('saga %s: step %d completed but is not recorded (no '
                     'worker to record it later): it stays in doubt',
                     exc.saga_id, exc.index)
        return
    # a saga step: its task id is the one its saga id was parsed from
    assert task.request.id is not None
    try:
        spool.put(Unrecorded(task.request.id, exc.saga_id, exc.index,
                             exc.token, exc.result))
        logger.warning('saga %s: step %d completed; its worker records it '
                       'once the store is back', exc.saga_id, exc.index)
    except OSError as err:
        logger.error('saga %s: step %d completed, and neither the store nor '
                     'the spool %s could take it (%r): it stays in doubt',
                     exc.saga_id, exc.index, spool.directory, err)


def _may_be_settled(state: AppState, request: Any) -> tuple[str, int]:
    """Why this copy may have a twin the saga record settled or superseded,
    or ``''``; and its publish generation (0: unknown, a copy without the
    identity headers such as a replacement).

    Such a copy is a redelivered message (kombu restored it after a worker
    died), one the sweep published again, one started after the sweep
    could have published its step again (its outbox window), or one
    started after its queue lease could have lapsed.  A heartbeat of
    margin covers clocks that differ between workers and Redis.
    """
    headers = getattr(request, 'headers', None) or {}

    def header(name: str) -> Any:
        value = getattr(request, name, None)
        return headers.get(name) if value is None else value

    try:
        generation = (int(header(GENERATION) or 1)
                      if header(SAGA_ID) is not None else 0)
    except (TypeError, ValueError):
        generation = 0
    if (request.delivery_info or {}).get('redelivered'):
        return 'redelivered', generation
    if generation > 1:
        return 'published again', generation
    margin = state.settings.heartbeat_interval
    now = time.time()
    for name, why in ((OUTBOX_UNTIL, 'started after its outbox window'),
                      (DEADLINE, 'started after its lease')):
        try:
            limit = float(header(name))
        except (TypeError, ValueError):
            continue
        if now > limit - margin:
            return why, generation
    return '', generation


def _run_undo(state: AppState, task: AnyTask, orig: Callable[..., Any],
              info: TaskIdInfo, args: Any, kwargs: Any) -> Any:
    token = new_token()
    try:
        verdict = state.store.undo_begin(info.saga_id, info.index,
                                         info.attempt, token)
    except SagaStoreUnavailable as exc:
        # the body has not run: not a failed attempt; try again later
        raise _retry_later(state, task, exc) from exc
    if verdict is Reply.RUNNING:
        # another copy of this attempt holds it: the copy Celery sent for
        # its own retry, replace or requeue, racing that copy's release, or
        # a second copy while the first runs.  Try again shortly: released
        # by then, it runs; done or superseded, it stops.  Not for longer
        # than the undo's lease: this copy's worker renews the attempt
        # while it waits, so a copy whose worker died would otherwise be
        # kept alive by it, and the sweep would never count it lost.
        waited = task.request.retries * _recheck(state)
        if waited >= state.settings.step_timeout:
            logger.warning('saga %s: undo of step %d attempt %d still runs in '
                           'another copy after %.0fs; this copy stops (the '
                           'sweep sends the next attempt if that copy is '
                           'gone)', info.saga_id, info.index, info.attempt,
                           waited)
            return None
        logger.info('saga %s: undo of step %d attempt %d is running in '
                    'another copy; this copy tries again in %.1fs',
                    info.saga_id, info.index, info.attempt,
                    _recheck(state))
        raise _retry_later(state, task, None, _recheck(state))
    if verdict is not Reply.RUN:
        logger.info('saga %s: undo of step %d attempt %d not run: %s',
                    info.saga_id, info.index, info.attempt, verdict)
        return None
    try:
        retval = orig(task, *args, **kwargs)
    except (Retry, Ignore):
        # the undo task's own retry, replace (Celery sends the replacement
        # under this task id, then raises Ignore) or Ignore: not a failed
        # attempt; the attempt is queued again for the copy that follows
        # (an Ignore with nothing after it is re-sent by the sweep after
        # the queue timeout)
        _guarded(state.store.undo_release, info.saga_id, info.index, token)
        raise
    except Reject as exc:
        if exc.requeue:  # type: ignore[attr-defined]  # as above
            _guarded(state.store.undo_release, info.saga_id, info.index,
                     token)
            raise
        _guarded(state.coordinator.undo_failed, info, exc)
        _mark_handled(exc)
        raise
    except Exception as exc:
        _guarded(state.coordinator.undo_failed, info, exc)
        _mark_handled(exc)
        raise
    try:
        state.coordinator.undo_done(info, task.name)
    except SagaStoreUnavailable as exc:
        # the undo succeeded: it must not be counted as a failed attempt
        _mark_handled(exc)
        raise
    return retval


def _retry_later(state: AppState, task: AnyTask, exc: Exception | None,
                 countdown: float | None = None) -> Retry:
    """Have Celery send this message again after ``countdown`` seconds (a
    heartbeat by default), whatever the task's own retry budget (the body
    has not run)."""
    return task.retry(exc=exc, max_retries=task.request.retries + 1,
                      countdown=(state.settings.heartbeat_interval
                                 if countdown is None else countdown))


def _recheck(state: AppState) -> float:
    """Seconds before a copy that found its undo attempt running elsewhere
    tries again."""
    return min(1.0, state.settings.heartbeat_interval)


def _guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``fn``, logging instead of raising: the task's own exception is
    what Celery must see, and signal handlers must not raise into Celery."""
    try:
        fn(*args, **kwargs)
    except Exception:  # noqa: BLE001
        logger.exception('celery_compensate: %s%r failed',
                         getattr(fn, '__name__', fn), args[:2])


def _mark_handled(exc: BaseException) -> None:
    """Tell the ``task_failure`` handler that follows in this process that
    the failure is already recorded (it would only cost a round trip: the
    scripts ignore duplicates)."""
    try:
        exc._compensate_handled = True  # type: ignore[attr-defined]
    except AttributeError:
        pass


def _describe(exc: BaseException) -> str:
    return f'{type(exc).__name__}: {exc}'[:2000]


def connect_signals(app: Celery) -> tuple[Callable[..., None], ...]:
    """Connect the worker handlers for ``app``.

    Returns:
        tuple: the handlers.  They are connected weakly: the caller keeps
        them alive as long as the app (so an app is never pinned in memory
        by its signal handlers).
    """
    uid = f'celery_compensate.{id(app)}'

    def failed(info: TaskIdInfo, reason: str, started: bool,
               stopped: bool = False) -> None:
        state = find_state(app)
        if state is None:
            return
        if info.is_undo:
            state.coordinator.undo_failed(info, reason, started)
        else:
            # the copy is known by the generation its task id carries
            state.coordinator.step_failed(info, reason, stopped=stopped)

    def on_failure(sender: Any = None, task_id: str | None = None,
                   exception: BaseException | None = None,
                   args: Any = None, kwargs: Any = None, **_: Any) -> None:
        info = parse_task_id(task_id)
        if (info is None or getattr(sender, 'app', None) is not app
                or getattr(exception, '_compensate_handled', False)):
            return
        # here the task ran: a hard time limit or a lost pool child
        _guarded(lambda: failed(info, _describe(exception) if exception
                                else 'failed', True))

    def on_revoked(sender: Any = None, request: Any = None,
                   terminated: bool = False, expired: bool = False,
                   signum: Any = None, **_: Any) -> None:
        info = parse_task_id(getattr(request, 'id', None))
        if info is None or getattr(sender, 'app', None) is not app:
            return
        reason = ('expired' if expired else
                  f'revoked (terminated by {signum})' if terminated else
                  'revoked')
        # only a terminated copy had started running; a revoke (not an
        # expiry) stops the step on purpose: past a pivot it is not retried
        _guarded(lambda: failed(info, reason, bool(terminated),
                                stopped=not expired))

    def on_unknown(sender: Any = None, name: str | None = None,
                   id: str | None = None, **_: Any) -> None:
        info = parse_task_id(id)
        if info is None or getattr(sender, 'app', None) is not app:
            return
        _guarded(lambda: failed(
            info, f'task {name!r} is not registered in the worker', False))

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, 'app', None) is app:
            # all tasks are imported and bound; no tracer is built yet
            _guarded(wrap_app_tasks, app)

    handlers: tuple[Callable[..., None], ...] = (
        on_failure, on_revoked, on_unknown, on_worker_init)
    for signal, handler in zip(
            (celery_signals.task_failure, celery_signals.task_revoked,
             celery_signals.task_unknown, celery_signals.worker_init),
            handlers, strict=True):
        signal.connect(handler, dispatch_uid=f'{uid}.{handler.__name__}')
    return handlers
