"""Tracing (issue 13, part 3): OpenTelemetry spans of sagas run by real
workers, caught by the SDK's in-memory exporter (a threads worker in this
process) or by a JSON-lines file (prefork worker subprocesses)."""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from celery import group
from celery import signals as celery_signals
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from celery_compensate import ImproperlyConfigured, SagaState, install, saga
from celery_compensate.appstate import get_state
from celery_compensate.store import layout as L
from celery_compensate.tracing import (
    parse_traceparent, saga_span_context, step_span_id, undo_span_id,
)

from .. import tasks
from ..helpers import ledger, undone, wait_for
from ..spans import as_dict, read_file
from .test_recovery import HEARTBEAT, LEASE, SWEEP, _cluster, entries
from .test_windows import store_away_as_b_completes

ROOT = Path(__file__).resolve().parents[2]

TRACED = pytest.mark.compensate_conf(compensate_tracing=True)


@pytest.fixture(scope='session')
def span_exporter() -> InMemorySpanExporter:
    """The in-memory exporter of this process's tracer provider (set once:
    OpenTelemetry keeps the first global provider)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def exporter(span_exporter: InMemorySpanExporter
             ) -> Iterator[InMemorySpanExporter]:
    span_exporter.clear()
    yield span_exporter
    span_exporter.clear()


def spans_of(exporter: InMemorySpanExporter, trace_id: int
             ) -> list[dict[str, Any]]:
    return [as_dict(s) for s in exporter.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id]


def wait_spans(exporter: InMemorySpanExporter, trace_id: int, count: int,
               timeout: float = 15.0) -> list[dict[str, Any]]:
    """The spans of a trace once there are ``count`` of them (the last
    ones end a moment after the saga does)."""
    return wait_for(lambda: len(found := spans_of(exporter, trace_id))
                    >= count and found, timeout=timeout)


def by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    named = {s['name']: s for s in spans}
    assert len(named) == len(spans), [s['name'] for s in spans]
    return named


def event_names(span: dict[str, Any]) -> list[str]:
    return [e['name'] for e in span['events']]


def links_to(span: dict[str, Any]) -> list[int]:
    return [link['span_id'] for link in span['links']]


@TRACED
def test_a_compensated_saga_yields_its_tree_links_and_attributes(
        celery_app, celery_worker, rds, exporter):
    """One saga span from start to final state; a span per step and per
    undo attempt, children of it; each undo span links to the span of the
    step it undoes; ids derived from the saga id, so spans emitted by
    different processes fit together."""
    res = saga(tasks.do.si('a'), tasks.do.si('b'),
               tasks.do.si('c', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    sid = res.id
    root = saga_span_context(sid)
    spans = by_name(wait_spans(exporter, root.trace_id, 6))
    assert sorted(spans) == sorted([
        'saga', 'step 0 t.do', 'step 1 t.do', 'step 2 t.do',
        'undo 1 t.undo #1', 'undo 0 t.undo #1'])

    top = spans['saga']
    record = res.info()
    assert top['span_id'] == root.span_id and top['parent_id'] is None
    assert top['start'] == int(record.created * 1e9)
    assert top['end'] == int(record.ended * 1e9)
    assert top['attributes']['saga.id'] == sid
    assert top['attributes']['saga.state'] == 'COMPENSATED'
    assert top['attributes']['saga.step'] == 2
    assert 'c failed on purpose' in top['attributes']['saga.reason']
    assert event_names(top) == ['saga.started', 'saga.compensating',
                                'saga.compensated']
    assert top['events'][1]['attributes']['saga.step'] == 2
    assert top['status'] == 'UNSET'

    for i in range(3):
        step = spans[f'step {i} t.do']
        assert step['span_id'] == step_span_id(sid, i)
        assert step['parent_id'] == root.span_id
        assert step['attributes']['saga.id'] == sid
        assert step['attributes']['saga.step'] == i
        assert top['start'] <= step['start'] <= step['end'] <= top['end']
    assert spans['step 0 t.do']['attributes']['saga.outcome'] == 'done'
    assert event_names(spans['step 0 t.do']) == ['step.done']
    failed = spans['step 2 t.do']
    assert failed['status'] == 'ERROR'
    assert failed['attributes']['saga.outcome'] == 'failed'
    assert failed['attributes']['saga.state'] == 'COMPENSATING'
    assert 'c failed on purpose' in failed['attributes']['saga.reason']
    assert event_names(failed) == ['exception', 'saga.compensating',
                                   'step.failed']

    for i in (1, 0):
        undo = spans[f'undo {i} t.undo #1']
        assert undo['span_id'] == undo_span_id(sid, i, 1)
        assert undo['parent_id'] == root.span_id
        assert links_to(undo) == [step_span_id(sid, i)]
        assert undo['links'][0]['trace_id'] == root.trace_id
        assert undo['links'][0]['attributes'] == {'saga.link': 'undoes'}
        assert undo['attributes']['saga.undo.attempt'] == 1
        assert undo['attributes']['saga.step'] == i
        assert undo['attributes']['saga.outcome'] == 'done'
    # in reverse order, and the last one ended the saga
    assert spans['undo 1 t.undo #1']['end'] <= spans['undo 0 t.undo #1'][
        'start']
    last = spans['undo 0 t.undo #1']
    assert last['attributes']['saga.state'] == 'COMPENSATED'
    assert event_names(last) == ['saga.compensated', 'undo.done']


@TRACED
def test_a_completed_saga_has_its_parallel_stage_under_the_saga_span(
        celery_app, celery_worker, rds, exporter):
    res = saga(tasks.do.si('a'), group(tasks.do.si('b'), tasks.do.si('c')),
               tasks.do.si('d')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPLETED
    root = saga_span_context(res.id)
    spans = by_name(wait_spans(exporter, root.trace_id, 5))
    assert sorted(spans) == ['saga', 'step 0 t.do', 'step 1 t.do',
                             'step 2 t.do', 'step 3 t.do']
    top = spans['saga']
    assert top['attributes']['saga.state'] == 'COMPLETED'
    assert 'saga.reason' not in top['attributes']
    assert event_names(top) == ['saga.started', 'saga.completed']
    assert all(s['parent_id'] == root.span_id for s in spans.values()
               if s is not top)
    assert event_names(spans['step 3 t.do']) == ['saga.completed',
                                                 'step.done']
    assert spans['step 3 t.do']['attributes']['saga.state'] == 'COMPLETED'


@TRACED
def test_every_undo_attempt_has_a_span_linked_to_the_step(
        celery_app, celery_worker, rds, exporter):
    """The undo of 'a' fails once: attempt 1 is an error span that says
    when attempt 2 follows; both attempts link to step 0's span."""
    sid = 'traced-' + celery_app.conf.compensate_key_prefix
    rds.set(tasks.countdown_key(celery_app, sid, 'a'), 1)
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async(
        saga_id=sid)
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    root = saga_span_context(sid)
    spans = by_name(wait_spans(exporter, root.trace_id, 5))
    first, second = spans['undo 0 t.undo #1'], spans['undo 0 t.undo #2']
    assert first['span_id'] == undo_span_id(sid, 0, 1)
    assert second['span_id'] == undo_span_id(sid, 0, 2)
    assert links_to(first) == links_to(second) == [step_span_id(sid, 0)]
    assert first['status'] == 'ERROR'
    assert 'undo of a failed on purpose' in first['attributes'][
        'saga.reason']
    assert event_names(first) == ['exception', 'undo.retry_scheduled',
                                  'undo.failed']
    scheduled = first['events'][1]['attributes']
    assert scheduled['saga.undo.attempt'] == 2
    assert scheduled['saga.undo.countdown'] == 0.05
    assert second['status'] == 'UNSET'
    assert second['attributes']['saga.undo.attempt'] == 2
    assert first['end'] <= second['start']


@pytest.mark.compensate_conf(compensate_tracing=True,
                              compensate_undo_max_attempts=2)
def test_a_failed_compensation_and_its_operator_retry_each_end_a_span(
        celery_app, celery_worker, rds, exporter):
    """COMPENSATION_FAILED ends the saga span (an error); after an
    operator's retry the saga ends again in a ``saga retry`` span under
    it, so no span id is emitted twice."""
    sid = 'retried-' + celery_app.conf.compensate_key_prefix
    rds.set(tasks.countdown_key(celery_app, sid, 'a'), 2)
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async(
        saga_id=sid)
    assert res.wait(timeout=15) is SagaState.COMPENSATION_FAILED
    root = saga_span_context(sid)
    spans = by_name(wait_spans(exporter, root.trace_id, 5))
    top = spans['saga']
    assert top['status'] == 'ERROR'
    assert top['attributes']['saga.state'] == 'COMPENSATION_FAILED'
    assert event_names(top)[-1] == 'saga.compensation_failed'
    last = spans['undo 0 t.undo #2']
    assert last['attributes']['saga.state'] == 'COMPENSATION_FAILED'
    assert 'saga.compensation_failed' in event_names(last)
    assert res.retry()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    spans = by_name(wait_spans(exporter, root.trace_id, 7))
    again = spans['saga retry']
    assert again['parent_id'] == root.span_id
    assert again['attributes']['saga.retries'] == 1
    assert again['attributes']['saga.state'] == 'COMPENSATED'
    assert spans['undo 0 t.undo #3']['attributes']['saga.outcome'] == 'done'
    assert [s['span_id'] for s in spans.values()].count(root.span_id) == 1


@TRACED
def test_a_step_retried_by_celery_is_linked_from_its_undo_once_settled(
        celery_app, celery_worker, rds, exporter):
    """A run that ends in ``self.retry()`` settles nothing: it is a span of
    its own (outcome ``retried``); the run that completes the step has the
    step's span id, which the undo links to."""
    res = saga(tasks.flaky.si('a', 1), tasks.do.si('b', fail=True)
               ).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    root = saga_span_context(res.id)
    spans = wait_spans(exporter, root.trace_id, 5)
    runs = sorted((s for s in spans if s['name'] == 'step 0 t.flaky'),
                  key=lambda s: s['start'])
    assert [s['attributes']['saga.outcome'] for s in runs] == [
        'retried', 'done']
    assert runs[0]['span_id'] != step_span_id(res.id, 0)
    assert event_names(runs[0]) == ['step.retried']
    assert runs[1]['span_id'] == step_span_id(res.id, 0)
    undo = next(s for s in spans if s['name'].startswith('undo 0'))
    assert links_to(undo) == [step_span_id(res.id, 0)]


@TRACED
def test_a_ratio_sampler_keeps_or_drops_a_saga_whole(
        celery_app, celery_worker, rds, monkeypatch):
    """Without a caller, a saga's trace id is derived from its id and every
    process asks the sampler about it as about a root span: a ratio
    sampler keeps or drops each saga whole, never part of it."""
    ratio = TraceIdRatioBased(0.5)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ratio))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, 'get_tracer_provider', lambda: provider)

    def kept(sid: str) -> bool:
        low = saga_span_context(sid).trace_id & TraceIdRatioBased.TRACE_ID_LIMIT
        return low < ratio.bound

    prefix = celery_app.conf.compensate_key_prefix
    ids = [f'{prefix}-{n}' for n in range(40)]
    dropped = next(i for i in ids if not kept(i))
    sampled = next(i for i in ids if kept(i))
    for sid in (dropped, sampled):
        res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)
                   ).apply_async(saga_id=sid)
        assert res.wait(timeout=15) is SagaState.COMPENSATED
    spans = wait_spans(exporter, saga_span_context(sampled).trace_id, 4)
    assert sorted(s['name'] for s in spans) == [
        'saga', 'step 0 t.do', 'step 1 t.do', 'undo 0 t.undo #1']
    # the other saga ran before that one: none of its spans was kept
    assert spans_of(exporter, saga_span_context(dropped).trace_id) == []


@TRACED
def test_a_saga_started_inside_a_span_stays_in_its_trace(
        celery_app, celery_worker, rds, exporter):
    """The caller's span (a web request, say) is the saga span's parent;
    the record keeps its traceparent and the messages carry it, so the
    workers' spans join the same trace."""
    tracer = trace.get_tracer('tests')
    with tracer.start_as_current_span('POST /orders') as request:
        res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)
                   ).apply_async()
    caller = request.get_span_context()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    spans = by_name(wait_spans(exporter, caller.trace_id, 5))
    assert sorted(spans) == ['POST /orders', 'saga', 'step 0 t.do',
                             'step 1 t.do', 'undo 0 t.undo #1']
    record = res.info()
    assert parse_traceparent(record.trace_parent) == trace.SpanContext(
        caller.trace_id, caller.span_id, True, caller.trace_flags)
    root = saga_span_context(res.id, record.trace_parent)
    assert root.trace_id == caller.trace_id
    assert spans['saga']['span_id'] == root.span_id
    assert spans['saga']['parent_id'] == caller.span_id
    assert spans['step 1 t.do']['parent_id'] == root.span_id
    assert links_to(spans['undo 0 t.undo #1']) == [step_span_id(res.id, 0)]
    # nothing of it in a trace of its own
    assert spans_of(exporter, saga_span_context(res.id).trace_id) == []


@pytest.fixture
def instrumented() -> Iterator[None]:
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument()
    try:
        yield
    finally:
        instrumentor.uninstrument()


@TRACED
def test_with_the_celery_instrumentation_its_task_spans_are_linked(
        celery_app, celery_worker, rds, exporter, instrumented):
    """opentelemetry-instrumentation-celery's spans land in the saga's
    trace: each publish span under the saga span (it is current while a
    saga task is published), each run span under its publish span; each
    step or undo span is a child of the saga span and links to the run
    span of its task: one span of ours per step and per attempt, none
    duplicated."""
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    root = saga_span_context(res.id)
    spans = wait_spans(exporter, root.trace_id, 10)
    ids = [s['span_id'] for s in spans]
    assert len(ids) == len(set(ids))
    by_id = {s['span_id']: s for s in spans}
    ours = {s['name']: s for s in spans
            if s['name'].split()[0] in ('saga', 'step', 'undo')}
    assert sorted(ours) == ['saga', 'step 0 t.do', 'step 1 t.do',
                            'undo 0 t.undo #1']
    for name, task in (('step 0 t.do', 't.do'), ('step 1 t.do', 't.do'),
                       ('undo 0 t.undo #1', 't.undo')):
        assert ours[name]['parent_id'] == root.span_id
        runs = [by_id[i] for i in links_to(ours[name])
                if i in by_id and by_id[i]['name'].startswith('run/')]
        assert [r['name'] for r in runs] == [f'run/{task}']
        publish = by_id[runs[0]['parent_id']]
        assert publish['name'] == f'apply_async/{task}'
        assert publish['parent_id'] == root.span_id
    assert sorted(s['name'] for s in spans if s['name'].startswith('run/')
                  ) == ['run/t.do', 'run/t.do', 'run/t.undo']
    assert step_span_id(res.id, 0) in links_to(ours['undo 0 t.undo #1'])


@TRACED
def test_with_the_celery_instrumentation_a_retried_step_makes_no_cycle(
        celery_app, celery_worker, rds, exporter, instrumented):
    """A step retried by Celery publishes its retry while the step's
    derived span is current; the run that settles the step emits that span,
    which must not end up its own ancestor."""
    res = saga(tasks.flaky.si('a', 1), tasks.do.si('b', fail=True)
               ).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    spans = wait_spans(exporter, saga_span_context(res.id).trace_id, 9)
    by_id = {s['span_id']: s for s in spans}
    for span in spans:
        seen, at = set(), span
        while at is not None and at['parent_id'] is not None:
            assert at['span_id'] not in seen, f'a cycle through {at["name"]}'
            seen.add(at['span_id'])
            at = by_id.get(at['parent_id'])


@TRACED
def test_tracing_adds_no_round_trip_per_step(celery_app, celery_worker, rds,
                                             exporter):
    """As without tracing (tests/worker/test_invariants.py): 1 round trip
    to start and 1 per step; tracing adds one read per saga, by the process
    that records its end (for the saga span)."""
    store = get_state(celery_app).store
    calls: list[str] = []
    original = store.client.execute_command

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    saga(tasks.do.si('warm')).apply_async().wait(timeout=10)
    store.client.execute_command = counting
    try:
        for n in (3, 10):
            calls.clear()
            res = saga(*[tasks.do.si(f's{i}') for i in range(n)]
                       ).apply_async()
            wait_spans(exporter, saga_span_context(res.id).trace_id, n + 1)
            assert calls == ['EVALSHA'] * (n + 1) + ['HMGET'], calls
    finally:
        store.client.execute_command = original


@TRACED
def test_a_tracing_failure_never_reaches_celery_or_the_saga(
        celery_app, celery_worker, rds, exporter, monkeypatch, caplog):
    """A tracer that raises (a broken exporter or SDK) costs the spans,
    nothing else: the tasks succeed in Celery and the saga compensates."""
    def broken(*args, **kwargs):
        raise RuntimeError('tracer broken')

    monkeypatch.setattr(SdkTracer, 'start_span', broken)
    failures: list[Any] = []

    def on_failure(sender=None, task_id=None, exception=None, **_):
        failures.append((task_id, exception))

    celery_signals.task_failure.connect(on_failure, weak=False,
                                        dispatch_uid='traced-failures')
    try:
        with caplog.at_level(logging.WARNING, 'celery_compensate.tracing'):
            res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)
                       ).apply_async()
            assert res.wait(timeout=15) is SagaState.COMPENSATED
            wait_for(lambda: 'undo:a' in ' '.join(ledger(rds, celery_app,
                                                         res.id)))
            wait_for(lambda: caplog.text.count('tracing failed') >= 3)
    finally:
        celery_signals.task_failure.disconnect(
            dispatch_uid='traced-failures')
    # only the step that failed on purpose failed in Celery
    assert [task_id for task_id, _ in failures] == [f'{res.id}.s1']
    assert undone(ledger(rds, celery_app, res.id)) == ['a']
    assert spans_of(exporter, saga_span_context(res.id).trace_id) == []


def test_the_setting_is_a_flag_and_the_switch_overrides_it(celery_app):
    from celery import Celery
    bad = Celery('bad', broker=celery_app.conf.broker_url,
                 set_as_current=False)
    bad.conf.compensate_tracing = 'yes'
    with pytest.raises(ImproperlyConfigured, match='compensate_tracing'):
        install(bad)
    switched = Celery('switched', broker=celery_app.conf.broker_url,
                      set_as_current=False)
    switched.conf.compensate_tracing = False
    state = install(switched, tracing=True)
    assert state.settings.tracing and state.tracing is not None
    assert state.coordinator.tracing is state.tracing
    assert get_state(celery_app).tracing is None    # off by default


def test_tracing_without_opentelemetry_names_the_extra(celery_app,
                                                       monkeypatch):
    from celery import Celery
    monkeypatch.setitem(sys.modules, 'opentelemetry', None)
    monkeypatch.delitem(sys.modules, 'celery_compensate.tracing')
    app = Celery('no-otel', broker=celery_app.conf.broker_url,
                 set_as_current=False)
    with pytest.raises(ImproperlyConfigured,
                       match=r'pip install celery-compensate\[otel\]'):
        install(app, tracing=True)


_EAGER = '''
import sys
if {block}:
    # as if OpenTelemetry were not installed: any import of it fails
    sys.modules['opentelemetry'] = None
from celery import Celery
from celery_compensate import install, saga

app = Celery('eager', broker={url!r}, set_as_current=False)
app.conf.compensate_key_prefix = {prefix!r}
install(app, tracing={tracing})

@app.task(name='e.undo')
def undo(result, *args, **kwargs):
    return None

@app.task(name='e.do', compensate_with=undo)
def do(fail=False):
    if fail:
        raise ValueError('on purpose')
    return 'ok'

res = saga(do.si(), do.si(fail=True), app=app).apply()
print(res.state.value, 'celery_compensate.tracing' in sys.modules)
'''


@pytest.mark.parametrize('tracing', [False, True], ids=['off', 'on'])
def test_tracing_off_needs_no_opentelemetry(redis_url, rds, prefix, tracing):
    """Off (the default), a saga runs and compensates in a process where
    OpenTelemetry cannot be imported at all, and the tracing module is
    never loaded; on, it is (which shows the check sees it).  (redis-py 8
    imports OpenTelemetry itself when it is installed, so the test blocks
    it instead of looking for it.)"""
    out = subprocess.run(
        [sys.executable, '-c', _EAGER.format(
            url=redis_url, prefix=prefix, tracing=tracing,
            block=not tracing)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f'COMPENSATED {tracing}', out.stdout


@pytest.mark.prefork
def test_a_recovered_undo_after_a_whole_worker_kill_has_its_span(
        redis_url, span_exporter):
    """The worker running the undo of 'b' is SIGKILLed; the sweep counts
    the attempt lost and sends attempt 2, which another worker runs: its
    span is there (from that worker's process), a child of the saga span
    in the caller's trace (the sweep read the traceparent from the record)
    and linked to step 1's span; the killed attempt has none."""
    traces = Path(tempfile.mkstemp(prefix='compensate-spans-',
                                   suffix='.jsonl')[1])
    with _cluster(redis_url, worker_env={
            'COMPENSATE_TEST_TRACES': str(traces)}, tracing=True,
            step_timeout=LEASE, queue_timeout=2 * LEASE,
            heartbeat_interval=HEARTBEAT, recovery_interval=SWEEP
            ) as (app, rds, start):
        try:
            first = start('first')
            tracer = trace.get_tracer('tests')
            with tracer.start_as_current_span('checkout') as caller:
                res = saga(tasks.do.si('a'),
                           tasks.do.si('b', undo_hang_once=True),
                           tasks.do.si('c', fail=True), app=app).apply_async()
            wait_for(lambda: 'undo-hang:b' in entries(app, rds, res.id),
                     timeout=15)
            first.kill()
            start('second')
            assert res.wait(timeout=20) is SagaState.COMPENSATED
            sid, trace_id = res.id, caller.get_span_context().trace_id
            key = get_state(app).store.keys.saga(sid)
            assert rds.hget(key, L.TRACE_PARENT) == res.info().trace_parent
            root = saga_span_context(sid, res.info().trace_parent)
            assert root.trace_id == trace_id
            spans = wait_for(lambda: len(found := [
                s for s in read_file(traces) if s['trace_id'] == trace_id])
                >= 6 and found, timeout=15)
        finally:
            traces.unlink(missing_ok=True)
    named = by_name(spans)
    assert sorted(named) == ['saga', 'step 0 t.do', 'step 1 t.do',
                             'step 2 t.do', 'undo 0 t.undo #1',
                             'undo 1 t.undo #2']
    recovered = named['undo 1 t.undo #2']
    assert recovered['span_id'] == undo_span_id(sid, 1, 2)
    assert recovered['parent_id'] == root.span_id
    assert links_to(recovered) == [step_span_id(sid, 1)]
    assert recovered['attributes']['saga.undo.attempt'] == 2
    assert recovered['attributes']['saga.outcome'] == 'done'
    top = named['saga']
    assert top['span_id'] == root.span_id
    assert top['parent_id'] == caller.get_span_context().span_id
    assert top['attributes']['saga.state'] == 'COMPENSATED'
    assert undo_span_id(sid, 1, 1) not in {s['span_id'] for s in spans}


@pytest.mark.prefork
def test_a_step_completed_while_the_store_is_away_is_no_error(redis_url):
    """The step completes while the saga store takes no writes: its worker
    records it later (tests/worker/test_windows.py), so its span says
    ``unrecorded``, not an error; the saga completes and its span is
    emitted by the worker that recorded its end."""
    traces = Path(tempfile.mkstemp(prefix='compensate-spans-',
                                   suffix='.jsonl')[1])
    try:
        with store_away_as_b_completes(
                redis_url, COMPENSATE_TEST_TRACES=str(traces)
                ) as (app, rds, res):
            assert res.wait(timeout=LEASE + 15) is SagaState.COMPLETED
            trace_id = saga_span_context(res.id).trace_id
            spans = by_name(wait_for(lambda: len(found := [
                s for s in read_file(traces) if s['trace_id'] == trace_id])
                >= 4 and found, timeout=15))
    finally:
        traces.unlink(missing_ok=True)
    b = spans['step 1 t.do']
    assert b['span_id'] == step_span_id(res.id, 1)
    assert b['status'] == 'UNSET'
    assert b['attributes']['saga.outcome'] == 'unrecorded'
    assert event_names(b) == ['step.unrecorded']
    assert spans['saga']['attributes']['saga.state'] == 'COMPLETED'
    assert spans['step 2 t.do']['attributes']['saga.outcome'] == 'done'


@pytest.mark.compensate_conf(compensate_tracing=True,
                             compensate_forward_max_attempts=2,
                             compensate_undo_retry_backoff=0.05,
                             compensate_undo_retry_backoff_max=0.1)
def test_past_a_pivot_each_copy_has_its_span_and_forward_failed_is_an_error(
        celery_app, celery_worker, rds, exporter):
    """Past the pivot, the copy published again (task id ``.s2.2``) has a
    span of its own beside the first copy's; a saga that spends the budget
    ends its span FORWARD_FAILED, as an error."""
    res = saga(tasks.do.si('reserve'),
               tasks.do.si('capture').set(compensate_pivot=True),
               tasks.forward.si('ship', fail_times=2)).apply_async()
    assert res.wait(timeout=15) is SagaState.FORWARD_FAILED
    sid = res.id
    spans = by_name(wait_spans(exporter, saga_span_context(sid).trace_id, 5))
    assert sorted(spans) == sorted([
        'saga', 'step 0 t.do', 'step 1 t.do', 'step 2 t.forward',
        'step 2 t.forward (copy 2)'])
    assert spans['step 2 t.forward']['span_id'] == step_span_id(sid, 2)
    copy = spans['step 2 t.forward (copy 2)']
    assert copy['span_id'] == step_span_id(sid, 2, 2) != step_span_id(sid, 2)
    assert copy['attributes']['saga.outcome'] == 'failed'
    top = spans['saga']
    assert top['attributes']['saga.state'] == 'FORWARD_FAILED'
    assert event_names(top)[-1] == 'saga.forward_failed'
    assert top['status'] == 'ERROR'


@TRACED
def test_a_replaced_step_keeps_the_callers_trace(celery_app, celery_worker,
                                                 rds, exporter):
    """``self.replace()`` sends its replacement without the saga's
    headers: the worker looks the saga's trace parent up, so the rest of
    the saga stays in the caller's trace (it used to move to a trace of its
    own, its spans orphaned)."""
    tracer = trace.get_tracer('tests')
    with tracer.start_as_current_span('POST /orders') as request:
        res = saga(tasks.do.si('a'), tasks.replaced.si('b'),
                   tasks.do.si('c'), tasks.do.si('d', fail=True)
                   ).apply_async()
    caller = request.get_span_context()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    wait_spans(exporter, caller.trace_id, 9)
    assert spans_of(exporter, saga_span_context(res.id).trace_id) == []
    names = [s['name'] for s in spans_of(exporter, caller.trace_id)]
    assert 'step 2 t.do' in names and 'undo 2 t.undo #1' in names


@TRACED
def test_a_start_refused_for_a_taken_id_leaves_that_saga_in_its_trace(
        celery_app, celery_worker, rds, exporter):
    """A start that finds its id taken must not put the other saga's
    later tasks (here an operator's retry) in the refused caller's trace."""
    from celery_compensate import InvalidSaga
    rds.set(tasks.countdown_key(celery_app, 'taken-id', 'a'), 100)
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)
               ).apply_async(saga_id='taken-id')
    assert res.wait(timeout=15) is SagaState.COMPENSATION_FAILED
    tracer = trace.get_tracer('tests')
    with tracer.start_as_current_span('another request') as request:
        with pytest.raises(InvalidSaga, match='already exists'):
            saga(tasks.do.si('x')).apply_async(saga_id='taken-id')
    rds.set(tasks.countdown_key(celery_app, 'taken-id', 'a'), 0)
    assert res.retry() is True
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    other = request.get_span_context().trace_id
    assert [s['name'] for s in spans_of(exporter, other)] == [
        'another request']


def test_asking_for_tracing_after_install_is_warned(celery_app):
    from celery_compensate.settings import SettingWarning
    with pytest.warns(SettingWarning, match='installed already'):
        install(celery_app, tracing=True)


@TRACED
def test_a_nested_sagas_span_is_a_child_of_its_parents(
        celery_app, celery_worker, rds, exporter):
    res = saga(tasks.do.si('a'), saga(tasks.do.si('b'), tasks.do.si('c')),
               tasks.do.si('d', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    root = saga_span_context(res.id)
    child = f'{res.id}~1'
    # the outer saga, its steps a and d and the undo of a; the child's
    # saga span, steps b and c and their undos: one trace
    spans = wait_spans(exporter, root.trace_id, 10)
    sagas = [s for s in spans if s['name'] == 'saga']
    assert {s['attributes']['saga.id'] for s in sagas} == {res.id, child}
    inner = [s for s in sagas if s['attributes']['saga.id'] == child]
    assert all(s['parent_id'] == root.span_id for s in inner)
    # it ended COMPLETED, then again when its parent undid it (a saga that
    # ends twice emits its span twice: a known limit, docs/tracing.rst)
    assert [s['attributes']['saga.state'] for s in inner] == [
        'COMPLETED', 'COMPENSATED']
    mine = [s for s in spans if s['parent_id'] == inner[0]['span_id']]
    assert sorted(s['name'] for s in mine) == [
        'step 0 t.do', 'step 1 t.do', 'undo 0 t.undo #1', 'undo 1 t.undo #1']
