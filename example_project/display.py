"""How the demo shows what happens: progress while the orders run, a trail
per order, and the books.

Everything is plain text.  On a terminal the progress ends in a status line
rewritten about five times a second (and states are coloured, unless
``NO_COLOR`` is set); anywhere else only whole lines are printed.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Iterable, TextIO

from celery_compensate import SagaState, StepState, UndoState
from celery_compensate.store import SagaRecord, StepRecord

COLORS = {'green': '32', 'yellow': '33', 'red': '31', 'dim': '2'}
STATE_COLORS = {
    SagaState.COMPLETED: 'green', SagaState.COMPENSATED: 'yellow',
    SagaState.COMPENSATION_FAILED: 'red',
}


class Console:
    """Lines, and on a terminal one status line kept below them."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.live = stream.isatty() and os.environ.get('TERM') != 'dumb'
        self.color = self.live and not os.environ.get('NO_COLOR')
        self._status = False

    def paint(self, text: str, color: str | None) -> str:
        if not self.color or not color:
            return text
        return f'\x1b[{COLORS[color]}m{text}\x1b[0m'

    def state(self, state: SagaState) -> str:
        return self.paint(state.value, STATE_COLORS.get(state))

    def line(self, text: str = '') -> None:
        self.clear()
        self.stream.write(text + '\n')
        self.stream.flush()

    def status(self, text: str) -> None:
        """Show ``text`` in the status line (terminals only)."""
        if not self.live:
            return
        width = shutil.get_terminal_size().columns - 1
        if len(text) > width:
            text = text[:width - 3] + '...'
        self.stream.write('\r' + self.paint(text, 'dim') + '\x1b[K')
        self.stream.flush()
        self._status = True

    def clear(self) -> None:
        if self._status:
            self.stream.write('\r\x1b[K')
            self._status = False


def celery_command(url: str, saga_id: str) -> str:
    """The command that shows a saga of the shop from the saga store."""
    celery = os.path.join(os.path.dirname(sys.executable), 'celery')
    celery = os.path.relpath(celery) if os.path.exists(celery) else 'celery'
    return (f'SHOP_REDIS_URL={url} {celery} -A example_project.shop '
            f'compensate show {saga_id}')


def short(task_name: str | None) -> str:
    """``example_project.shop.charge_payment`` -> ``charge_payment``."""
    return (task_name or '?').rsplit('.', 1)[-1]


def ordinal(n: int) -> str:
    suffix = {1: 'st', 2: 'nd', 3: 'rd'}.get(
        n % 10 if n % 100 not in (11, 12, 13) else 0, 'th')
    return f'{n}{suffix}'


# -- progress ---------------------------------------------------------------

@dataclass
class Watch:
    """What was already reported about one saga."""

    state: SagaState = SagaState.RUNNING
    failed: set[int] = field(default_factory=set)
    attempts_reported: dict[int, int] = field(default_factory=dict)


def failed_undo_attempts(step: StepRecord) -> int:
    """How many attempts of the step's undo failed so far.

    ``undo_attempts`` counts the attempt under way (queued, running,
    waiting for its turn, or done) and, once the budget is spent, the last
    one that failed.
    """
    if step.undo_state is UndoState.FAILED:
        return step.undo_attempts
    return max(step.undo_attempts - 1, 0)


def changes(watch: Watch, record: SagaRecord) -> list[str]:
    """What happened to the saga since ``watch`` last saw it, as phrases;
    updates ``watch``."""
    said = []
    for step in record.steps:
        if step.state is StepState.FAILED and step.index not in watch.failed:
            watch.failed.add(step.index)
            said.append(f'{short(step.task_name)} failed: {step.failure}')
        failed_attempts = failed_undo_attempts(step)
        seen = watch.attempts_reported.get(step.index, 0)
        if failed_attempts > seen:
            watch.attempts_reported[step.index] = failed_attempts
            tries = (f'attempt {failed_attempts}' if failed_attempts == seen + 1
                     else f'attempts {seen + 1}-{failed_attempts}')
            then = ('gave up' if step.undo_state is UndoState.FAILED
                    else f'attempt {failed_attempts + 1} follows')
            said.append(f'{short(step.undo_name)}: {tries} failed '
                        f'({step.undo_error}), {then}')
    if record.state is not watch.state:
        watch.state = record.state
        if record.state is SagaState.COMPENSATED:
            undone = sum(s.undo_state is UndoState.DONE for s in record.steps)
            said.append(f'COMPENSATED ({undone} step{"s" * (undone != 1)} '
                        'undone)' if undone else
                        'COMPENSATED (nothing to undo)')
        elif record.state is SagaState.COMPENSATING:
            if said and ' failed: ' in said[-1]:
                said[-1] += ' -> compensating'
            else:
                said.append('compensating')
        else:
            said.append(record.state.value)
    return said


def doing(record: SagaRecord) -> list[str]:
    """What a saga that is not final is busy with: a label per step or
    undo in flight."""
    busy = []
    for s in record.steps:
        if s.state is StepState.RUNNING:
            busy.append(short(s.task_name))
        if s.undo_state in (UndoState.QUEUED, UndoState.RUNNING,
                            UndoState.WAITING):
            label = f'undo {short(s.task_name)}'
            if s.undo_attempts > 1 or s.undo_state is UndoState.WAITING:
                label += f' (attempt {s.undo_attempts}'
                label += ', waiting)' if s.undo_state is UndoState.WAITING \
                    else ')'
            busy.append(label)
    return busy


def status_line(elapsed: float, records: dict[str, SagaRecord | None]) -> str:
    """``1.2s  3/7 done | charge_payment: 1004 1005 | undo ...: 1003``:
    the orders (by id) grouped by what they are busy with."""
    groups: dict[str, list[str]] = {}
    final = 0
    for order_id, record in records.items():
        if record is None:
            continue
        if record.state.is_final:
            final += 1
            continue
        for label in doing(record) or ['waiting']:
            groups.setdefault(label, []).append(order_id)
    return (f'{elapsed:5.1f}s  {final}/{len(records)} done | '
            + ' | '.join(f'{label}: {" ".join(ids)}'
                         for label, ids in groups.items()))


# -- the trail of one order -------------------------------------------------

@dataclass(frozen=True)
class Row:
    at: float | None
    what: str
    step: str
    text: str
    color: str | None = None
    notes: tuple[str, ...] = ()


def trail_rows(record: SagaRecord, audit: dict[str, str]) -> list[Row]:
    """One row per thing done, failed and undone, in the order it
    happened; then the undos still to do (last undone first) and the steps
    that never ran."""
    rows, pending, never = [], [], []
    for s in record.steps:
        name = short(s.task_name)
        if s.state is StepState.DONE:
            rows.append(Row(s.settled_at, 'done', name,
                            audit.get(name, '(done)')))
        elif s.state is StepState.FAILED:
            rows.append(Row(s.settled_at, 'FAILED', name, s.failure or '?',
                            'red'))
        elif s.state is StepState.RUNNING:
            rows.append(Row(None, 'running', name, '(still running)'))
        else:
            never.append(name)
        undo = short(s.undo_name)
        failed = failed_undo_attempts(s)
        notes: tuple[str, ...] = ()
        if s.undo_state is UndoState.FAILED:
            notes = (f'the last error: {s.undo_error}',)
        elif failed > 0:
            which = 'attempt 1' if failed == 1 else f'attempts 1-{failed}'
            notes = (f'{which} failed, the last with: {s.undo_error}',)
        if s.undo_state is UndoState.DONE:
            text = audit.get(undo, '(undone)')
            if s.undo_attempts > 1:
                text += f'  [on the {ordinal(s.undo_attempts)} attempt]'
            rows.append(Row(s.undone_at, 'undone', name, text, 'yellow',
                            notes))
        elif s.undo_state is UndoState.FAILED:
            pending.append(Row(None, 'NOT UNDONE', name,
                               f'{undo} gave up after {s.undo_attempts} '
                               'attempts', 'red', notes))
        elif s.undo_state is not UndoState.NONE:
            pending.append(Row(None, f'undo {s.undo_state.name.lower()}',
                               name, undo, 'yellow', notes))
        elif (s.state is StepState.DONE and s.undo_name and record.state in (
                SagaState.COMPENSATING, SagaState.COMPENSATION_FAILED)):
            pending.append(Row(None, 'not undone', name,
                               f'{undo} waits for the undos after it',
                               'red'))
    timed = sorted(rows, key=lambda r: (r.at is None, r.at or 0))
    if never:
        pending.insert(0, Row(None, 'not run', ', '.join(never), '', 'dim'))
    return timed + pending[::-1]


def format_trail(console: Console, record: SagaRecord,
                 audit: dict[str, str], indent: str = '    ') -> list[str]:
    """The aligned rows of :func:`trail_rows`, times relative to the
    saga's start."""
    rows = trail_rows(record, audit)
    what_w = max([len('not run')] + [len(r.what) for r in rows])
    step_w = max([len('charge_payment')] + [len(r.step) for r in rows
                                             if r.text])
    lines = []
    for r in rows:
        at = f'{r.at - record.created:5.2f}s' if r.at is not None else ''
        what = console.paint(f'{r.what:<{what_w}}', r.color)
        lines.append(f'{indent}{at:>6}  {what}  {r.step:<{step_w}}  {r.text}'
                     .rstrip())
        pad = ' ' * (len(indent) + 6 + 2 + what_w + 2 + step_w + 2)
        lines.extend(pad + console.paint(note, 'dim') for note in r.notes)
    return lines


# -- the books --------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    """One figure of the books: before, after and what it should be."""

    kind: str
    name: str
    before: int
    after: int
    expected: int
    note: str = ''

    @property
    def ok(self) -> bool:
        return self.after == self.expected and not self.note


def format_books(console: Console, lines: Iterable[Line],
                 indent: str = '  ') -> list[str]:
    lines = list(lines)
    kind_w = max(len(x.kind) for x in lines)
    name_w = max(len(x.name) for x in lines)
    num_w = max(len(str(n)) for x in lines
                for n in (x.before, x.after, x.expected))
    out = []
    for x in lines:
        verdict = (console.paint('ok', 'green') if x.ok
                   else console.paint('WRONG', 'red'))
        out.append(
            f'{indent}{x.kind:<{kind_w}}  {x.name:<{name_w}}  '
            f'{x.before:>{num_w}} -> {x.after:>{num_w}}  '
            f'(expected {x.expected:>{num_w}})  {verdict}'
            + (f'  {x.note}' if x.note else ''))
    return out
