"""``make demo-traces``: the shop with tracing on, and the trace of one
order printed as a tree.

The worker's pool children and the demo write their spans to one file,
a JSON line per span (``SHOP_TRACES`` names it): an exporter to a
collector would do in production, but a file shows the tree without one.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor, SpanExporter, SpanExportResult,
)

from celery_compensate import SagaRecord, StepState
from celery_compensate.tracing import saga_span_context

Span = dict[str, Any]


class JsonLinesExporter(SpanExporter):
    """Appends each span as a JSON line to ``path``, in one ``write`` to a
    file opened with ``O_APPEND`` (pool children share the file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = ''.join(json.dumps(as_dict(s)) + '\n' for s in spans).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS


def as_dict(span: ReadableSpan) -> Span:
    """A span as a plain dict (ids as ints, times in ns): one JSON line."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        'name': span.name, 'trace_id': ctx.trace_id, 'span_id': ctx.span_id,
        'parent_id': span.parent.span_id if span.parent else None,
        'start': span.start_time, 'end': span.end_time,
        'status': span.status.status_code.name,
        'attributes': dict(span.attributes or {}),
        'events': [{'name': e.name, 'time': e.timestamp,
                    'attributes': dict(e.attributes or {})}
                   for e in span.events],
        'links': [{'trace_id': link.context.trace_id,
                   'span_id': link.context.span_id,
                   'attributes': dict(link.attributes or {})}
                  for link in span.links],
    }


def export_to(path: str) -> None:
    """This process's spans go to ``path`` (synchronously: nothing is lost
    when a pool child exits)."""
    provider = TracerProvider(resource=Resource.create(
        {'service.name': 'shop'}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)


def read_trace(path: str | Path, trace_id: int) -> list[Span]:
    path = Path(path)
    if not path.exists():
        return []
    spans = (json.loads(line) for line in path.read_text().splitlines()
             if line.strip())
    return [s for s in spans if s['trace_id'] == trace_id]


def expected_spans(record: SagaRecord) -> int:
    """How many spans a finished saga's trace has at least: the saga's,
    one per step that ran, one per undo attempt."""
    return 1 + sum(s.state is not StepState.PENDING for s in record.steps) \
        + sum(s.undo_attempts for s in record.steps)


def wait_for_trace(path: str | Path, record: SagaRecord,
                   timeout: float = 10.0) -> list[Span]:
    """The spans of a finished saga, once all are written (the last ones
    end a moment after the saga does)."""
    trace_id = saga_span_context(record.saga_id, record.trace_parent).trace_id
    deadline = time.monotonic() + timeout
    while True:
        spans = read_trace(path, trace_id)
        if (len(spans) >= expected_spans(record)
                or time.monotonic() > deadline):
            return spans
        time.sleep(0.1)


def _short(name: str) -> str:
    """``step 1 example_project.shop.charge_payment`` -> ``step 1
    charge_payment``."""
    return ' '.join(w.rsplit('.', 1)[-1] if '.' in w else w
                    for w in name.split(' '))


def format_tree(spans: list[Span]) -> list[str]:
    """The spans of one trace as a tree: children under their parent by
    start time, times in seconds from the trace's first span, each span's
    outcome (``[error]``: its status), its links (an undo's to the step it
    undoes) and its events, but the ``*.done`` ones its outcome tells."""
    if not spans:
        return ['(no spans)']
    by_id = {s['span_id']: s for s in spans}
    children: dict[int | None, list[Span]] = {}
    for s in spans:
        parent = s['parent_id'] if s['parent_id'] in by_id else None
        children.setdefault(parent, []).append(s)
    t0 = min(s['start'] for s in spans)
    width = max(len(_short(s['name'])) for s in spans) + 8

    def secs(ns: int) -> str:
        return f'{(ns - t0) / 1e9:5.2f}'

    lines: list[str] = []

    def walk(span: Span, lead: str, tail: str) -> None:
        attrs = span['attributes']
        kids = sorted(children.get(span['span_id'], []),
                      key=lambda s: s['start'])
        label = f'{lead}{_short(span["name"])}'
        outcome = str(attrs.get('saga.state', '') if span['name'].startswith(
            'saga') else attrs.get('saga.outcome', ''))
        if span['status'] == 'ERROR':
            outcome += ' [error]'
        line = (f'{label:<{width}} {secs(span["start"])} -> '
                f'{secs(span["end"])}s  {outcome}')
        for link in span['links']:
            target = by_id.get(link['span_id'])
            line += (f'  -> links {_short(target["name"])}' if target
                     else f'  -> links {link["span_id"]:016x}')
        lines.append(line.rstrip())
        inner = tail + ('│  ' if kids else '   ')
        reason = attrs.get('saga.reason')
        if reason:
            lines.append(f'{inner}    reason: {reason}')
        # what an event says that its span does not
        told = {k: v for k, v in attrs.items() if k != 'saga.step'
                or not span['name'].startswith('saga')}
        for event in span['events']:
            if event['name'] == 'exception' or event['name'].endswith(
                    '.done'):
                continue
            extra = ', '.join(
                f'{k.removeprefix("saga.")}={v}'
                for k, v in event['attributes'].items()
                if told.get(k, object()) != v and k != 'saga.state')
            lines.append(f'{inner}   {secs(event["time"])}s  {event["name"]}'
                         + (f' ({extra})' if extra else ''))
        for n, kid in enumerate(kids):
            last = n == len(kids) - 1
            walk(kid, tail + ('└─ ' if last else '├─ '),
                 tail + ('   ' if last else '│  '))

    for root in sorted(children.get(None, []), key=lambda s: s['start']):
        walk(root, '', '')
    return lines


def trace_heading(spans: list[Span]) -> str:
    if not spans:
        return ''
    first = min(spans, key=lambda s: s['start'])
    when = datetime.fromtimestamp(first['start'] / 1e9, timezone.utc)
    at = f'{when:%H:%M:%S.%f}'[:-3]
    return f'trace {first["trace_id"]:032x}, {len(spans)} spans, from {at} UTC'
