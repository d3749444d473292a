"""Spans as plain dicts, from the in-memory exporter of this process or
from a JSON-lines file a worker subprocess writes (``COMPENSATE_TEST_TRACES``
in ``tests/prefork_app.py``): an in-memory exporter sees only the process
it runs in.  The file and its lines are the demo's
(``example_project/traces.py``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from example_project.traces import JsonLinesExporter, as_dict

__all__ = ('as_dict', 'export_to_file', 'read_file')


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
