"""Spans as plain dicts, from the in-memory exporter of this process or
from a JSON-lines file a worker subprocess writes (``COMPENSATE_TEST_TRACES``
in ``tests/prefork_app.py``): an in-memory exporter sees only the process
it runs in."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor, SpanExporter, SpanExportResult,
)


def as_dict(span: ReadableSpan) -> dict[str, Any]:
    """What the tests look at of a span (ids as ints, times in ns)."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        'name': span.name,
        'trace_id': ctx.trace_id,
        'span_id': ctx.span_id,
        'parent_id': span.parent.span_id if span.parent else None,
        'start': span.start_time,
        'end': span.end_time,
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


class JsonLinesExporter(SpanExporter):
    """Appends each span as one JSON line to ``path``: one ``write`` of
    the whole line on a file opened with ``O_APPEND``, so the pool children
    of a prefork worker can share the file."""

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


def export_to_file(path: str) -> None:
    """Make this process's tracer provider write every span to ``path``
    (synchronously: a pool child may be killed right after)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)


def read_file(path: str | Path) -> list[dict[str, Any]]:
    """The spans a worker wrote to ``path`` so far."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()
            if line.strip()]
