"""OpenTelemetry spans for sagas: ``install(app, tracing=True)`` or the
``compensate_tracing`` setting (``pip install celery-compensate[otel]``).

Imported only when tracing is on.  Spans go to the global tracer provider
(``opentelemetry.trace.set_tracer_provider``), which must be the SDK's
:class:`~opentelemetry.sdk.trace.TracerProvider` (until one is set, nothing
is emitted).  A saga's trace::

    saga                      from its start to its final state
    ├─ step 0 <task>          a step's body and its record
    ├─ step 1 <task>
    ├─ undo 0 <undo task> #1  an undo attempt, linked to step 0's span

A saga runs in several processes and a span cannot be ended in another
process than the one that started it, so every span context is derived
from ids: the trace id and the saga span's id from the saga id (the trace
id is the caller's when the saga was started inside a span), a step
span's from (saga id, step), an undo span's from (saga id, step, attempt).
Step and undo spans name the saga span as their parent and an undo span
links to the step span it undoes, whichever process emitted them.  The
saga span itself is emitted once, by the process that records the saga's
final state, with the record's creation time as its start and its
transitions as events.  See ``docs/tracing.rst`` for the choices.
"""
from __future__ import annotations

import copy
import hashlib
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from celery.exceptions import Ignore, Reject, Retry
from celery.utils.log import get_logger
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.id_generator import (
    IdGenerator, RandomIdGenerator,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import (
    Link, NonRecordingSpan, ProxyTracerProvider, SpanContext, Status,
    StatusCode, TraceFlags,
)
from opentelemetry.util.types import AttributeValue

from . import signals
from .exceptions import CompletionNotRecorded
from .messages import TRACE_PARENT
from .model import SagaState, TaskIdInfo
from .store import layout as L

if TYPE_CHECKING:
    from celery import Task

    from .appstate import AppState

__all__ = ('Tracing', 'saga_span_context', 'step_span_id', 'undo_span_id',
           'format_traceparent', 'parse_traceparent', 'TRACER_NAME')

logger = get_logger(__name__)

#: The instrumentation scope of the spans.
TRACER_NAME = 'celery_compensate'

#: Sagas whose trace parent a process remembers (it never changes once
#: the saga started), so publishing from the sweep or an operator reads
#: it from the record at most once per saga.
REMEMBERED = 4096

#: Attributes
SAGA_ID = 'saga.id'
STEP = 'saga.step'
STATE = 'saga.state'
ATTEMPT = 'saga.undo.attempt'
REASON = 'saga.reason'
TASK = 'saga.task'
OUTCOME = 'saga.outcome'
RETRIES = 'saga.retries'

_TRACEPARENT = re.compile(
    r'^00-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})$')

#: what a saga's final transition is called as an event
_FINAL_EVENTS = {
    SagaState.COMPLETED: 'saga.completed',
    SagaState.COMPENSATED: 'saga.compensated',
    SagaState.COMPENSATION_FAILED: 'saga.compensation_failed',
    SagaState.FORWARD_FAILED: 'saga.forward_failed',
}


# -- ids --------------------------------------------------------------------

def _digest(*parts: object) -> bytes:
    text = '\x1f'.join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=16,
                           person=b'celery-compensat').digest()


def _span_id(*parts: object) -> int:
    # an all-zero id is invalid: never derived in practice, still refused
    return int.from_bytes(_digest(*parts)[:8], 'big') or 1


def step_span_id(saga_id: str, index: int, generation: int = 0) -> int:
    """The span id of step ``index`` of a saga (the run that settled it);
    past a pivot, a copy published again (its task id carries its
    ``generation``) has one of its own."""
    if generation > 1:
        return _span_id('step', saga_id, index, generation)
    return _span_id('step', saga_id, index)


def undo_span_id(saga_id: str, index: int, attempt: int) -> int:
    """The span id of attempt ``attempt`` of the undo of step ``index``."""
    return _span_id('undo', saga_id, index, attempt)


def parse_traceparent(value: Any) -> SpanContext | None:
    """The (remote) span context a W3C ``traceparent`` names, or ``None``
    when ``value`` is not one."""
    m = _TRACEPARENT.match(value) if isinstance(value, str) else None
    if m is None:
        return None
    ctx = SpanContext(int(m['trace'], 16), int(m['span'], 16), is_remote=True,
                      trace_flags=TraceFlags(int(m['flags'], 16) & 0xff))
    return ctx if ctx.is_valid else None


def format_traceparent(ctx: SpanContext) -> str:
    """The W3C ``traceparent`` of a span context."""
    return f'00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}'


def saga_span_context(saga_id: str, trace_parent: str | None = None,
                      sampler: Sampler | None = None) -> SpanContext:
    """The span context of a saga's span.

    Arguments:
        trace_parent: the ``traceparent`` of the span the saga was started
            in (its record's ``trace_parent``): the saga is in that trace
            and follows its sampling decision.  Without one the trace id is
            derived from the saga id.
        sampler: decides, without a ``trace_parent``, whether the saga is
            sampled (as for a root span of that trace id: a ratio sampler
            decides the same in every process); without one it is.
    """
    caller = parse_traceparent(trace_parent)
    if caller is not None:
        trace_id, flags = caller.trace_id, caller.trace_flags
    else:
        trace_id = int.from_bytes(_digest('trace', saga_id), 'big') or 1
        sampled = sampler is None or sampler.should_sample(
            None, trace_id, 'saga').decision is Decision.RECORD_AND_SAMPLE
        flags = TraceFlags(TraceFlags.SAMPLED if sampled
                           else TraceFlags.DEFAULT)
    return SpanContext(trace_id, _span_id('saga', saga_id), is_remote=True,
                       trace_flags=flags)


class _Ids(IdGenerator):
    """Hands the SDK's tracer the ids of the span being started (its trace
    id for a root span), per thread; random ones otherwise."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._random = RandomIdGenerator()

    @contextmanager
    def next(self, trace_id: int, span_id: int | None) -> Iterator[None]:
        self._local.ids = (trace_id, span_id)
        try:
            yield
        finally:
            self._local.ids = None

    def generate_span_id(self) -> int:
        ids = getattr(self._local, 'ids', None)
        if ids is None or ids[1] is None:
            return self._random.generate_span_id()
        return int(ids[1])

    def generate_trace_id(self) -> int:
        ids = getattr(self._local, 'ids', None)
        if ids is None:
            return self._random.generate_trace_id()
        return int(ids[0])


# -- what a run collects ----------------------------------------------------

@dataclass
class _Run:
    """A saga step or undo attempt running in this thread."""

    info: TaskIdInfo
    name: str
    task_name: str
    parent: SpanContext
    context: SpanContext            #: what the body sees as its parent
    links: list[Link]
    attributes: dict[str, AttributeValue]
    start: int = 0                  #: ns; 0 until the body runs
    raised: int = 0                 #: ns, when the body raised
    events: list[tuple[str, dict[str, AttributeValue], int]] = field(
        default_factory=list)
    #: the saga's state after a transition made during the run
    state: SagaState | None = None

    def event(self, name: str, **attributes: AttributeValue) -> None:
        self.events.append((name, attributes, time.time_ns()))


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, 'headers', None) or {}).get(name)
    return value


def _describe(exc: BaseException) -> str:
    return f'{type(exc).__name__}: {exc}'[:2000]


def _ns(seconds: str | None) -> int | None:
    try:
        return int(float(seconds) * 1e9) if seconds else None
    except ValueError:
        return None


class Tracing:
    """The spans of one app's sagas (:attr:`AppState.tracing`).

    Arguments:
        state: the app's state.
    """

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.app = state.app
        self._ids = _Ids()
        self._lock = threading.Lock()
        self._tracer: tuple[object, SdkTracer | None] | None = None
        self._parents: OrderedDict[str, str | None] = OrderedDict()
        self._local = threading.local()
        self._warned = False
        #: the signal handlers, connected weakly: the app's state keeps them
        self.handlers = self._connect()

    # -- the tracer ---------------------------------------------------------

    def tracer(self) -> SdkTracer | None:
        """This process's tracer, with the ids the spans need; ``None``
        while no SDK tracer provider is set (nothing is emitted)."""
        provider = trace.get_tracer_provider()
        cached = self._tracer
        if cached is not None and cached[0] is provider:
            return cached[1]
        tracer = None
        if isinstance(provider, SdkTracerProvider):
            base = provider.get_tracer(TRACER_NAME)
            if isinstance(base, SdkTracer):
                # a copy of our own: same processors, sampler and resource,
                # with ids derived from the saga instead of random ones
                tracer = copy.copy(base)
                tracer.id_generator = self._ids
        elif not isinstance(provider, ProxyTracerProvider) and not self._warned:
            self._warned = True
            logger.warning(
                'celery_compensate: tracing needs the OpenTelemetry SDK\'s '
                'TracerProvider (its span ids are derived from the saga); '
                '%s emits no saga spans', type(provider).__name__)
        self._tracer = (provider, tracer)
        return tracer

    # -- a saga's trace parent ----------------------------------------------

    def _remember(self, saga_id: str, trace_parent: str | None) -> None:
        with self._lock:
            self._parents[saga_id] = trace_parent
            self._parents.move_to_end(saga_id)
            while len(self._parents) > REMEMBERED:
                self._parents.popitem(last=False)

    def trace_parent(self, saga_id: str) -> str | None:
        """The ``traceparent`` the saga was started in: remembered from its
        start or from a task of it run here, else read from its record."""
        with self._lock:
            if saga_id in self._parents:
                return self._parents[saga_id]
        value = self.state.store.fields(
            saga_id, L.TRACE_PARENT)[L.TRACE_PARENT]
        self._remember(saga_id, value)
        return value

    def _saga_context(self, saga_id: str,
                      trace_parent: str | None) -> SpanContext:
        tracer = self.tracer()
        return saga_span_context(saga_id, trace_parent,
                                 tracer.sampler if tracer else None)

    # -- hooks (TraceHooks) -------------------------------------------------

    def started(self, saga_id: str) -> str | None:
        """The ``traceparent`` of the current span (the saga's caller), to
        keep in the saga's record; ``None`` outside any span."""
        try:
            ctx = trace.get_current_span().get_span_context()
            return format_traceparent(ctx) if ctx.is_valid else None
        except Exception:  # noqa: BLE001 - tracing must not stop a saga
            logger.warning('saga %s: cannot read the current span',
                           saga_id, exc_info=True)
            return None

    def nested(self, parent_id: str) -> str | None:
        """The ``traceparent`` of saga ``parent_id``'s span: a nested
        saga's span is a child of its parent's (``None``: none)."""
        try:
            ctx = self._saga_context(parent_id, self.trace_parent(parent_id))
            return format_traceparent(ctx)
        except Exception:  # noqa: BLE001 - tracing must not stop a saga
            logger.warning('saga %s: cannot read its span', parent_id,
                           exc_info=True)
            return None

    def created(self, saga_id: str, trace_parent: str | None) -> None:
        """The saga's record was written: remember its trace parent for
        what this process publishes of it."""
        self._remember(saga_id, trace_parent)

    @contextmanager
    def publishing(self, saga_id: str,
                   headers: dict[str, Any]) -> Iterator[None]:
        """Publish a saga task in the saga's trace: the message carries the
        caller's ``traceparent`` (if any), and the saga span is current, so
        a Celery instrumentation's publish span is a child of it."""
        token = None
        try:
            parent = self.trace_parent(saga_id)
            # '' says "no caller": a copy without the header at all (a
            # replacement) looks its saga's trace parent up instead
            headers[TRACE_PARENT] = parent or ''
            token = context_api.attach(trace.set_span_in_context(
                NonRecordingSpan(self._saga_context(saga_id, parent))))
        except Exception:  # noqa: BLE001 - the publish goes on untraced
            logger.warning('saga %s: the task is published outside its '
                           'trace', saga_id, exc_info=True)
        try:
            yield
        finally:
            if token is not None:
                context_api.detach(token)

    def run(self, task: Task[..., Any], info: TaskIdInfo,
            call: Callable[..., Any],
            runner: Callable[[Callable[..., Any]], Any]) -> Any:
        """Run a step or undo (``runner(call)``) in a span of its own,
        emitted when it ends, if its body ran."""
        try:
            tracer = self.tracer()
            run = self._begin(task, info) if tracer is not None else None
        except Exception:  # noqa: BLE001
            logger.warning('saga %s: step %d runs untraced', info.saga_id,
                           info.index, exc_info=True)
            tracer = run = None
        if tracer is None or run is None:
            return runner(call)

        def body(task: Task[..., Any], *args: Any, **kwargs: Any) -> Any:
            run.start = time.time_ns()
            # spans the body makes are children of the step's span
            token = context_api.attach(trace.set_span_in_context(
                NonRecordingSpan(run.context)))
            try:
                return call(task, *args, **kwargs)
            except BaseException:
                run.raised = time.time_ns()
                raise
            finally:
                context_api.detach(token)

        runs = self._runs()
        runs.append(run)
        error: BaseException | None = None
        try:
            return runner(body)
        except BaseException as exc:
            error = exc
            raise
        finally:
            runs.remove(run)
            if run.start:
                self._guarded(self._end_run, tracer, run, error)

    # -- spans --------------------------------------------------------------

    def _runs(self) -> list[_Run]:
        runs: list[_Run] | None = getattr(self._local, 'runs', None)
        if runs is None:
            runs = self._local.runs = []
        return runs

    def _begin(self, task: Task[..., Any], info: TaskIdInfo) -> _Run:
        parent_tp = _header(task.request, TRACE_PARENT)
        if parent_tp is None:
            # no header at all: a copy Celery sent without the saga's
            # headers (self.replace()): what this process knows of the
            # saga, else one read of its record
            parent_tp = self.trace_parent(info.saga_id)
        else:
            if parse_traceparent(parent_tp) is None:
                parent_tp = None
            # what this task publishes goes to the same trace
            self._remember(info.saga_id, parent_tp)
        saga = self._saga_context(info.saga_id, parent_tp)
        links: list[Link] = []
        # a span current while the task runs (a Celery instrumentation's
        # run span) is linked, not made the parent: the step's span id is
        # derived, and a run that does not settle the step (a Celery retry,
        # a replacement) publishes the next copy while that id is current,
        # so the run that settles it would be its own ancestor
        current = trace.get_current_span().get_span_context()
        parent = saga
        if current.is_valid:
            links.append(Link(current, {'saga.link': 'task'}))
        attributes: dict[str, AttributeValue] = {
            SAGA_ID: info.saga_id, STEP: info.index, TASK: task.name}
        if info.is_undo:
            undone = SpanContext(saga.trace_id,
                                 step_span_id(info.saga_id, info.index),
                                 is_remote=True, trace_flags=saga.trace_flags)
            links.append(Link(undone, {'saga.link': 'undoes'}))
            attributes[ATTEMPT] = info.attempt
            span_id = undo_span_id(info.saga_id, info.index, info.attempt)
            name = f'undo {info.index} {task.name} #{info.attempt}'
        else:
            span_id = step_span_id(info.saga_id, info.index, info.generation)
            name = f'step {info.index} {task.name}'
            if info.generation > 1:
                name += f' (copy {info.generation})'
        context = SpanContext(saga.trace_id, span_id, is_remote=False,
                              trace_flags=saga.trace_flags)
        return _Run(info, name, task.name, parent, context, links,
                    attributes)

    def _end_run(self, tracer: SdkTracer, run: _Run,
                 error: BaseException | None) -> None:
        kind = 'undo' if run.info.is_undo else 'step'
        end = time.time_ns()
        span_id: int | None = run.context.span_id
        attributes = dict(run.attributes)
        status = Status(StatusCode.UNSET)
        if error is None:
            attributes[OUTCOME] = 'done'
            run.events.append((f'{kind}.done', {}, end))
        elif isinstance(error, CompletionNotRecorded):
            # it completed: its worker records it once the store is back
            attributes[OUTCOME] = 'unrecorded'
            attributes[REASON] = _describe(error)
            run.events.append((f'{kind}.unrecorded',
                               {REASON: _describe(error)}, end))
        elif isinstance(error, (Retry, Ignore)) or (
                isinstance(error, Reject)
                and error.requeue):  # type: ignore[attr-defined]
            # not settled: the step or attempt runs again in another copy,
            # which is the span its undo links to (or the next attempt)
            span_id = None
            attributes[OUTCOME] = 'retried'
            run.events.append((f'{kind}.retried',
                               {REASON: _describe(error)}, end))
        else:
            attributes[OUTCOME] = 'failed'
            attributes[REASON] = _describe(error)
            status = Status(StatusCode.ERROR, _describe(error))
            run.events.append((f'{kind}.failed', {REASON: _describe(error)},
                               end))
        if run.state is not None:
            attributes[STATE] = run.state.value
        with self._ids.next(run.context.trace_id, span_id):
            span = tracer.start_span(
                run.name, context=trace.set_span_in_context(
                    NonRecordingSpan(run.parent), context_api.Context()),
                attributes=attributes, links=run.links,
                start_time=run.start)
        exception_at = run.raised or end
        for name, attrs, at in sorted(run.events, key=lambda e: e[2]):
            if error is not None and exception_at <= at and (
                    status.status_code is StatusCode.ERROR):
                span.record_exception(error, timestamp=exception_at)
                error = None
            span.add_event(name, attrs, timestamp=at)
        span.set_status(status)
        span.end(end_time=end)

    def _saga_ended(self, saga_id: str, state: SagaState) -> None:
        """Emit the saga's span, from its start to this final state (one
        read of its record)."""
        tracer = self.tracer()
        if tracer is None:
            return
        names = (L.CREATED, L.CSTART, L.ENDED, L.REASON, L.FAILED,
                 L.RETRIES, L.TRACE_PARENT)
        fields = self.state.store.fields(saga_id, *names)
        start = _ns(fields[L.CREATED])
        if start is None:
            return      # gone (forgotten or expired) meanwhile
        end = _ns(fields[L.ENDED]) or time.time_ns()
        parent_tp = fields[L.TRACE_PARENT]
        saga = self._saga_context(saga_id, parent_tp)
        attributes: dict[str, AttributeValue] = {
            SAGA_ID: saga_id, STATE: state.value}
        reason, failed = fields[L.REASON], fields[L.FAILED]
        if reason:
            attributes[REASON] = reason
        if failed:
            attributes[STEP] = int(failed)
        events: list[tuple[str, dict[str, AttributeValue], int]] = [
            ('saga.started', {}, start)]
        cstart = _ns(fields[L.CSTART])
        if cstart is not None:
            started: dict[str, AttributeValue] = {}
            if failed:
                started[STEP] = int(failed)
            if reason:
                started[REASON] = reason
            events.append(('saga.compensating', started, cstart))
        events.append((_FINAL_EVENTS[state], {STATE: state.value}, end))
        retries = int(fields[L.RETRIES] or 0)
        name, span_id = 'saga', saga.span_id
        parent = parse_traceparent(parent_tp)
        if retries:
            # it ended before this (COMPENSATION_FAILED) and an operator
            # retried it: that end emitted the saga span
            attributes[RETRIES] = retries
            name, span_id, parent = ('saga retry',
                                     _span_id('retry', saga_id, retries),
                                     saga)
        context = (trace.set_span_in_context(NonRecordingSpan(parent),
                                             context_api.Context())
                   if parent is not None else context_api.Context())
        with self._ids.next(saga.trace_id, span_id):
            span = tracer.start_span(name, context=context,
                                     attributes=attributes, start_time=start)
        for event, attrs, at in events:
            span.add_event(event, attrs, timestamp=at)
        if state in (SagaState.COMPENSATION_FAILED,
                     SagaState.FORWARD_FAILED):
            span.set_status(Status(StatusCode.ERROR, reason or state.value))
        span.end(end_time=end)

    # -- signals --------------------------------------------------------------

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Tracing never raises into Celery or the saga: log instead."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            logger.warning('celery_compensate: tracing failed in %s',
                           getattr(fn, '__name__', fn), exc_info=True)

    def _event(self, saga_id: str, name: str,
               state: SagaState | None = None,
               **attributes: AttributeValue) -> None:
        """An event on the span of the run of ``saga_id`` in this thread
        (if any): the transitions its record made."""
        for run in reversed(self._runs()):
            if run.info.saga_id == saga_id:
                run.event(name, **attributes)
                if state is not None:
                    run.state = state
                return

    def _connect(self) -> tuple[Callable[..., None], ...]:
        app = self.app
        uid = f'celery_compensate.tracing.{id(app)}'

        def on_compensation_started(sender: Any = None, saga_id: str = '',
                                    step: int | None = None,
                                    reason: Any = None, **_: Any) -> None:
            if sender is not app:
                return
            attributes: dict[str, AttributeValue] = {}
            if step is not None:
                attributes[STEP] = step
            if reason:
                attributes[REASON] = str(reason)
            self._guarded(lambda: self._event(
                saga_id, 'saga.compensating', SagaState.COMPENSATING,
                **attributes))

        def on_undo_retry(sender: Any = None, saga_id: str = '',
                          step: int = 0, attempt: int = 0,
                          countdown: float = 0.0, **_: Any) -> None:
            if sender is not app:
                return
            self._guarded(lambda: self._event(
                saga_id, 'undo.retry_scheduled', None,
                **{STEP: step, ATTEMPT: attempt + 1,
                   'saga.undo.countdown': float(countdown)}))

        def ended(state: SagaState) -> Callable[..., None]:
            def on_end(sender: Any = None, saga_id: str = '',
                       error: Any = None, **_: Any) -> None:
                if sender is not app:
                    return
                attributes: dict[str, AttributeValue] = {}
                if error:
                    attributes[REASON] = str(error)
                self._guarded(lambda: self._event(
                    saga_id, _FINAL_EVENTS[state], state, **attributes))
                self._guarded(self._saga_ended, saga_id, state)
            on_end.__name__ = f'on_{state.value.lower()}'
            return on_end

        handlers: list[tuple[Any, Callable[..., None]]] = [
            (signals.compensation_started, on_compensation_started),
            (signals.undo_retry, on_undo_retry),
            (signals.saga_completed, ended(SagaState.COMPLETED)),
            (signals.saga_compensated, ended(SagaState.COMPENSATED)),
            (signals.compensation_failed,
             ended(SagaState.COMPENSATION_FAILED)),
            (signals.saga_forward_failed, ended(SagaState.FORWARD_FAILED)),
        ]
        for signal, handler in handlers:
            signal.connect(handler, dispatch_uid=f'{uid}.{handler.__name__}')
        return tuple(handler for _, handler in handlers)
