"""``celery -A proj compensate``: list, show, retry and abort sagas.

Registered through the ``celery.commands`` entry point, so Celery loads
the app (``-A``, ``--broker`` ...) exactly as for ``celery inspect``.
Every command takes ``--json`` for scripts.  Exit codes:

=== ==========================================================
0   done
1   an error: the saga store is unreachable, a record is corrupt,
    the app is not installed
2   bad usage (click's own code): unknown option, malformed id
3   no saga with this id (never started, or expired)
4   the saga is in the wrong state for ``retry``/``abort``;
    nothing was changed
=== ==========================================================
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable, NoReturn, Sequence

import click

from .exceptions import CompensateError, InvalidSaga, SagaNotFound
from .appstate import AppState, get_state
from .model import (
    CHILD_TASK, SagaState, StepState, UndoState, child_saga_id, step_task_id,
    undo_task_id,
    validate_saga_id,
)
from .store import Listed, Reply, SagaRecord, StepRecord, StepSummary

__all__ = ('compensate', 'EXIT_ERROR', 'EXIT_NOT_FOUND', 'EXIT_WRONG_STATE')

EXIT_ERROR = 1
EXIT_NOT_FOUND = 3
EXIT_WRONG_STATE = 4

_json_option = click.option('--json', 'as_json', is_flag=True,
                            help='Print JSON instead of a table.')
_color_option = click.option(
    '--no-color', 'no_color', is_flag=True,
    help='No colours (also off with NO_COLOR set, or when not a terminal).')

#: the colour of each state (of sagas, steps and undos), by name
_COLOURS = {
    'COMPLETED': 'green', 'DONE': 'green',
    'RUNNING': 'yellow', 'COMPENSATING': 'yellow', 'QUEUED': 'yellow',
    'WAITING': 'yellow',
    'COMPENSATED': 'cyan',
    'FAILED': 'red', 'COMPENSATION_FAILED': 'red', 'FORWARD_FAILED': 'red',
    'CORRUPT': 'red',
}


class _Exit(Exception):
    """Stop a command with ``code``, an error name for ``--json`` and a
    message for people."""

    def __init__(self, code: int, error: str, message: str,
                 **extra: Any) -> None:
        super().__init__(message)
        self.code, self.error, self.message, self.extra = (
            code, error, message, extra)


def _run(ctx: click.Context, as_json: bool, body: Callable[[AppState], Any]
         ) -> None:
    """Run ``body`` with the app's state; print its result (or error) as
    text or JSON and exit with the documented code."""
    try:
        out = body(get_state(ctx.obj.app))
    except _Exit as exc:
        _fail(as_json, exc.code, exc.error, exc.message, **exc.extra)
    except SagaNotFound as exc:
        _fail(as_json, EXIT_NOT_FOUND, 'not-found', str(exc),
              saga_id=exc.saga_id)
    except CompensateError as exc:
        _fail(as_json, EXIT_ERROR, type(exc).__name__, str(exc))
    if as_json:
        click.echo(json.dumps(out[0], indent=2, default=_jsonable))
    else:
        click.echo(out[1])


def _fail(as_json: bool, code: int, error: str, message: str,
          **extra: Any) -> NoReturn:
    if as_json:
        click.echo(json.dumps({'error': error, 'message': message, **extra},
                              indent=2, default=_jsonable))
    click.echo(f'Error: {message}', err=True)
    sys.exit(code)


def _saga_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_saga_id(value, nested=True)
    except (InvalidSaga, ValueError) as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


_saga_arg = click.argument('saga_id', callback=_saga_id)


@click.group(name='compensate')
@click.pass_context
def compensate(ctx: click.Context) -> None:
    """Inspect and repair sagas (celery_compensate)."""
    # retry and abort publish undos, which must be registered tasks: import
    # the app's task modules (``include``, ``imports``, autodiscovery) as a
    # worker or ``celery shell`` would
    if ctx.obj is not None and getattr(ctx.obj, 'app', None) is not None:
        ctx.obj.app.loader.import_default_modules()


@compensate.command(name='list')
@click.option('--state', type=click.Choice([s.value for s in SagaState],
                                           case_sensitive=False),
              help='Only sagas in this state.')
@click.option('--limit', type=click.IntRange(min=1), default=50,
              show_default=True, help='At most this many sagas.')
@click.option('--before', metavar='SAGA_ID', callback=lambda c, p, v: (
                  _saga_id(c, p, v) if v else None),
              help='Only sagas started before this one (the next page).')
@click.option('--no-children', 'no_children', is_flag=True,
              help='Hide nested sagas (ids with "~"): outermost sagas only.')
@_json_option
@_color_option
@click.pass_context
def list_(ctx: click.Context, state: str | None, limit: int,
          before: str | None, no_children: bool, as_json: bool,
          no_color: bool) -> None:
    """Sagas, newest first: id, state, age and what each waits for.  When
    more are left than ``--limit``, the command for the next page is
    printed on stderr."""
    def body(st: AppState) -> tuple[Any, str]:
        want = SagaState(state.upper()) if state else None
        until = st.store.created_at(before) if before else None
        found = st.store.list_sagas(want, limit + 1, before=until,
                                    children=not no_children)
        more = len(found) > limit
        found = found[:limit]
        now = time.time()
        data = [{'saga_id': e.saga_id, 'state': e.state,
                 'created': e.created, 'age': round(now - e.created, 3),
                 'current': _current(e), 'error': e.error} for e in found]
        if not found:
            return data, f'no sagas{f" in state {want.value}" if want else ""}'
        if more and not as_json:
            again = ' '.join(filter(None, (
                f'--state {want.value}' if want else '',
                f'--limit {limit}', '--no-children' if no_children else '',
                f'--before {found[-1].saga_id}')))
            click.echo(f'more: celery compensate list {again}', err=True)
        return data, _table(('SAGA ID', 'STATE', 'AGE', 'CURRENT'), [
            (e.saga_id, e.state, _age(now - e.created), _current(e))
            for e in found], width=_width(False), paint=_painter(no_color),
            coloured=(1,))
    _run(ctx, as_json, body)


@compensate.command()
@_saga_arg
@click.option('--wide', is_flag=True,
              help='Full results and errors (else cut to the terminal).')
@_json_option
@_color_option
@click.pass_context
def show(ctx: click.Context, saga_id: str, wide: bool, as_json: bool,
         no_color: bool) -> None:
    """A saga's plan: each step's task, task id, state, timings and result,
    and each undo, in the order they ran, with its attempts and last
    error."""
    def body(st: AppState) -> tuple[Any, str]:
        record = st.store.read(saga_id)
        tree = _tree(st, record)
        data = _record_json(record)
        data['children'] = tree
        return data, _show(record, _width(wide), _painter(no_color), tree)
    _run(ctx, as_json, body)


@compensate.command()
@_saga_arg
@_json_option
@click.pass_context
def retry(ctx: click.Context, saga_id: str, as_json: bool) -> None:
    """Re-drive a saga that waits for an operator: a COMPENSATION_FAILED
    one from the undo that failed (finished undos are never repeated), a
    FORWARD_FAILED one from the step past its pivot that failed."""
    def body(st: AppState) -> tuple[Any, str]:
        outcome = st.coordinator.retry(saga_id)
        _check(outcome.status, saga_id, outcome.old_state,
               'COMPENSATION_FAILED or FORWARD_FAILED', 'retry')
        if outcome.old_state is SagaState.FORWARD_FAILED:
            steps = [{'step': s.index, 'task': s.call.name,
                      'task_id': step_task_id(
                          saga_id, s.index,
                          outcome.generations.get(s.index, 0))}
                     for s in outcome.forward]
            text = [f'saga {saga_id}: {outcome.old_state} -> '
                    f'{outcome.new_state}; steps sent again:']
            text += [f'  step {s["step"]} {s["task"]} ({s["task_id"]})'
                     for s in steps]
            return ({'saga_id': saga_id, 'retried': True,
                     'old_state': outcome.old_state,
                     'new_state': outcome.new_state, 'steps': steps},
                    '\n'.join(text))
        after = st.store.read(saga_id)
        if after.state is SagaState.COMPENSATION_FAILED:
            # an undo was refused at once (not a task of this app?)
            why = '; '.join(f'undo of step {s.index} {s.undo_name}: '
                            f'{s.undo_error}' for s in after.current)
            raise _Exit(EXIT_ERROR, 'failed-again',
                        f'saga {saga_id} is COMPENSATION_FAILED again at '
                        f'once: {why}', saga_id=saga_id)
        undos = [{'step': d.step.index, 'task': d.step.undo.name
                  if d.step.undo else None, 'attempt': d.attempt,
                  'task_id': undo_task_id(saga_id, d.step.index, d.attempt)}
                 for d in outcome.undos]
        text = [f'saga {saga_id}: {outcome.old_state} -> '
                f'{outcome.new_state}; undos sent again:']
        text += [f'  step {u["step"]} {u["task"]} attempt {u["attempt"]} '
                 f'({u["task_id"]})' for u in undos]
        return ({'saga_id': saga_id, 'retried': True,
                 'old_state': outcome.old_state,
                 'new_state': outcome.new_state, 'undos': undos},
                '\n'.join(text))
    _run(ctx, as_json, body)


@compensate.command()
@_saga_arg
@click.option('--reason', default='by an operator', show_default=True,
              help='Recorded as the saga\'s reason ("aborted: <reason>").')
@_json_option
@click.pass_context
def abort(ctx: click.Context, saga_id: str, reason: str,
          as_json: bool) -> None:
    """Stop a RUNNING saga: revoke its in-flight steps and compensate what
    completed (as SagaResult.abort())."""
    def body(st: AppState) -> tuple[Any, str]:
        outcome = st.coordinator.abort(saga_id, f'aborted: {reason}')
        _check(outcome.status, saga_id, outcome.old_state,
               SagaState.RUNNING, 'abort')
        if outcome.status is Reply.PAST_PIVOT:
            raise _Exit(EXIT_WRONG_STATE, 'past-pivot',
                        f'saga {saga_id} passed its pivot: it can only go '
                        'forward, so it cannot be aborted; nothing was '
                        'changed', saga_id=saga_id, state=outcome.old_state)
        revoked = ', '.join(str(i) for i in outcome.stopped) or 'none'
        return ({'saga_id': saga_id, 'aborted': True,
                 'old_state': outcome.old_state,
                 'new_state': outcome.new_state,
                 'revoked_steps': outcome.stopped,
                 'undos': [d.step.index for d in outcome.undos]},
                f'saga {saga_id}: {outcome.old_state} -> '
                f'{outcome.new_state} (aborted: {reason}); steps revoked: '
                f'{revoked}')
    _run(ctx, as_json, body)


def _check(status: Reply, saga_id: str, state: SagaState | None,
           needed: SagaState | str, verb: str) -> None:
    if status is Reply.MISSING:
        raise SagaNotFound(saga_id)
    if status in (Reply.WRONG_STATE, Reply.NOT_RUNNING):
        raise _Exit(EXIT_WRONG_STATE, 'wrong-state',
                    f'saga {saga_id} is {state}, not {needed}: cannot {verb} '
                    'it; nothing was changed', saga_id=saga_id,
                    state=state)


# -- presentation ----------------------------------------------------------

def _current(entry: Listed) -> str:
    """What a listed saga waits for, in a few words."""
    summary = entry.summary
    if summary is None:
        return f'unreadable record: {entry.error}'
    parts = [_waits_for(step, entry.saga_id) for step in summary.steps]
    more = summary.waiting - len(summary.steps)
    if more > 0:
        parts.append(f'{more} more')
    return '; '.join(parts) or '-'


def _waits_for(step: StepSummary | StepRecord,
               saga_id: str | None = None) -> str:
    child = getattr(step, 'child', None)
    if child is None and saga_id and step.task_name == CHILD_TASK:
        child = child_saga_id(saga_id, step.index)
    if child is not None and step.state is StepState.RUNNING:
        return f'step {step.index} nested saga {child} running'
    if child is not None and step.undo_state is UndoState.RUNNING:
        return f'undo of step {step.index}: nested saga {child} compensating'
    if step.state is StepState.RUNNING:
        return f'step {step.index} {step.task_name} running'
    if step.state is StepState.FAILED and step.undo_state is UndoState.NONE:
        # only listed for a FORWARD_FAILED saga: past its pivot
        return (f'step {step.index} {step.task_name} failed past the pivot; '
                'retry drives it forward')
    if step.undo_state is UndoState.FAILED:
        return (f'undo of step {step.index} {step.undo_name} failed after '
                f'{step.undo_attempts} attempts: {_cut(step.undo_error, 60)}')
    return (f'undo of step {step.index} {step.undo_name} '
            f'{step.undo_state.name.lower()} (attempt {step.undo_attempts})')


def _doing(record: SagaRecord) -> str:
    return '; '.join(_waits_for(step) for step in record.current) or '-'


def _tree(st: AppState, record: SagaRecord) -> list[dict[str, Any]]:
    """The sagas nested in ``record``, and theirs: ``{'step', 'saga_id',
    'state', 'children'}`` each (state ``None``: not started)."""
    nodes = []
    for step in record.steps:
        if step.child is None:
            continue
        try:
            child = st.store.read(step.child)
        except SagaNotFound:
            nodes.append({'step': step.index, 'saga_id': step.child,
                          'state': None, 'children': []})
            continue
        nodes.append({'step': step.index, 'saga_id': step.child,
                      'state': child.state.value,
                      'children': _tree(st, child)})
    return nodes


def _tree_lines(nodes: list[dict[str, Any]], paint: Callable[[str], str],
                indent: str = '') -> list[str]:
    lines = []
    for n, node in enumerate(nodes):
        last = n == len(nodes) - 1
        state = paint(node['state']) if node['state'] else 'not started'
        lines.append(f'{indent}{"└─" if last else "├─"} step {node["step"]}: '
                     f'{node["saga_id"]} {state}')
        lines += _tree_lines(node['children'], paint,
                             indent + ('   ' if last else '│  '))
    return lines


def _show(record: SagaRecord, width: int | None = None,
          paint: Callable[[str], str] = str,
          tree: list[dict[str, Any]] | None = None) -> str:
    now = time.time()
    lines = [
        f'saga     {record.saga_id}',
        f'state    {paint(record.state.value)}',
        f'created  {_when(record.created)} ({_age(now - record.created)} ago)',
    ]
    if record.ended:
        lines.append(f'ended    {_when(record.ended)} (took '
                     f'{_age(record.ended - record.created)})')
    if record.reason:
        lines.append(f'reason   {record.reason}')
    if record.failed_step is not None:
        name = (record.steps[record.failed_step].task_name
                if 0 <= record.failed_step < len(record.steps) else '?')
        lines.append(f'failed   step {record.failed_step} {name}')
    if record.retries:
        lines.append(f'retried  {record.retries} time(s) by an operator')
    if record.parent is not None:
        lines.append(f'parent   {record.parent[0]} (its step '
                     f'{record.parent[1]})')
    lines.append(f'waiting  {_doing(record)}')
    if tree:
        lines.append('nested')
        lines += ['  ' + line for line in _tree_lines(tree, paint)]
    if width is not None:
        lines = [line if len(line) <= width else _cut(line, max(width, 20))
                 for line in lines]
    lines += ['', _table(
        ('STEP', 'STAGE', 'TASK', 'TASK ID', 'STATE', 'STARTED', 'TOOK',
         'RESULT (FOR ITS UNDO) / ERROR'),
        [(s.index, s.stage, _task_label(s), s.task_id, s.state.name,
          _offset(s.started_at, record.created),
          _took(s.started_at, s.settled_at),
          json.dumps(s.result) if s.state is StepState.DONE
          else s.failure or '')
         for s in record.steps], width=width, paint=paint, coloured=(4,),
        optional=(3, 1))]
    # in the order they ran (then the ones that never started)
    undos = sorted((s for s in record.steps if s.undo_attempts), key=lambda s: (
        s.undo_started_at is None, s.undo_started_at or 0.0, s.index))
    if undos:
        lines += ['', _table(
            ('UNDO OF', 'TASK', 'TASK ID', 'STATE', 'ATTEMPTS', 'STARTED',
             'DONE', 'LAST ERROR'),
            [(s.index, s.undo_name or f'(saga {s.child} compensates)',
              '' if s.child else s.undo_task_id, s.undo_state.name,
              s.undo_attempts, _offset(s.undo_started_at, record.created),
              _offset(s.undone_at, record.created),
              s.undo_error or '') for s in undos],
            width=width, paint=paint, coloured=(3,), optional=(2,))]
    return '\n'.join(lines)


def _task_label(step: StepRecord) -> str:
    """The step's task, marked when it is the pivot, and with its forward
    attempts once it failed past the pivot; a nested saga's id."""
    if step.child is not None:
        return f'saga {step.child}'
    label = step.task_name + (' (pivot)' if step.pivot else '')
    if step.attempts > 1:
        label += f' (attempt {step.attempts})'
    return label


def _width(wide: bool) -> int | None:
    """The width to fit: the terminal's (or ``COLUMNS``), none with
    ``--wide`` or when the output is not a terminal."""
    if wide:
        return None
    columns = os.environ.get('COLUMNS', '')
    if columns.isdigit():
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def _painter(no_color: bool) -> Callable[[str], str]:
    """Colour a state's name: off with ``--no-color``, ``NO_COLOR`` set,
    or output that is not a terminal."""
    if no_color or os.environ.get('NO_COLOR') or not sys.stdout.isatty():
        return str
    return lambda text: (click.style(text, fg=_COLOURS[text])
                         if text in _COLOURS else text)


def _record_json(record: SagaRecord) -> dict[str, Any]:
    data = asdict(record)
    data['current'] = _doing(record)
    for step, raw in zip(record.steps, data['steps'], strict=True):
        raw['state'] = step.state.name
        raw['undo_state'] = step.undo_state.name
    return data


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
           width: int | None = None, paint: Callable[[str], str] = str,
           coloured: Sequence[int] = (), optional: Sequence[int] = ()
           ) -> str:
    """Columns aligned to their widest cell, the last one left ragged.

    With ``width``, the ``optional`` columns are dropped while the table
    would leave the last column fewer than 20 characters, and the last
    column is cut to fit.  The cells of the ``coloured`` columns are
    painted after padding, so colours do not move columns.
    """
    cells = [[str(c).replace('\n', ' ') for c in r]
             for r in (headers, *rows)]
    widths = [max(len(r[n]) for r in cells) for n in range(len(headers))]
    keep = list(range(len(headers)))

    def fixed() -> int:
        return sum(widths[n] + 2 for n in keep[:-1])
    if width is not None:
        for n in optional:
            if fixed() + 20 <= width:
                break
            keep.remove(n)
        room = max(width - fixed(), 10)
        for row in cells:
            row[-1] = _cut(row[-1], room)
        widths[-1] = max(len(r[-1]) for r in cells)
    lines = []
    for number, row in enumerate(cells):
        padded = {n: row[n].ljust(widths[n]) for n in keep}
        if number:
            for n in coloured:
                if n in padded:
                    padded[n] = paint(row[n]) + padded[n][len(row[n]):]
        lines.append('  '.join(padded[n] for n in keep).rstrip())
    return '\n'.join(lines)


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f'{seconds:.1f}s'
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f'{minutes}m{sec:02d}s'
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f'{hours}h{minutes:02d}m'
    days, hours = divmod(hours, 24)
    return f'{days}d{hours:02d}h'


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime(
        '%Y-%m-%d %H:%M:%S UTC')


def _offset(ts: float | None, start: float) -> str:
    """A time as seconds after the saga started."""
    return '-' if ts is None else f'+{ts - start:.3f}s'


def _took(start: float | None, end: float | None) -> str:
    return '-' if start is None or end is None else f'{end - start:.3f}s'


def _cut(text: str | None, width: int) -> str:
    text = (text or '').replace('\n', ' ')
    return text if len(text) <= width else text[:width - 3] + '...'


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    return str(value)

