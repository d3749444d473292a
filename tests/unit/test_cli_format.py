"""How ``celery compensate`` lays out text for a person at a terminal."""
from __future__ import annotations

import re
import sys

import click

from celery_compensate import cli

_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def test_colours_do_not_move_columns():
    rows = [('s-1', 'COMPLETED', 'x'), ('s-22', 'COMPENSATION_FAILED', 'y')]
    plain = cli._table(('ID', 'STATE', 'NOTE'), rows)
    painted = cli._table(('ID', 'STATE', 'NOTE'), rows,
                         paint=lambda t: click.style(t, fg='red'),
                         coloured=(1,))
    assert _ANSI.sub('', painted) == plain
    assert painted.count('\x1b[31m') == 2          # each state, not the header


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    monkeypatch.delenv('NO_COLOR', raising=False)
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    assert cli._painter(False)('FAILED') == click.style('FAILED', fg='red')
    assert cli._painter(False)('t.do') == 't.do'    # not a state
    assert cli._painter(True)('FAILED') == 'FAILED'  # --no-color
    monkeypatch.setenv('NO_COLOR', '1')
    assert cli._painter(False)('FAILED') == 'FAILED'
    monkeypatch.delenv('NO_COLOR')
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: False)
    assert cli._painter(False)('FAILED') == 'FAILED'


def test_a_narrow_table_drops_optional_columns_then_cuts_the_last():
    rows = [('0', 'a-very-long-task-id-that-takes-room.s0', 'DONE',
             'an error message that goes on and on and on')]
    text = cli._table(('STEP', 'TASK ID', 'STATE', 'ERROR'), rows, width=40,
                      optional=(1,))
    assert all(len(line) <= 40 for line in text.splitlines())
    assert 'TASK ID' not in text and text.splitlines()[1].endswith('...')
    assert cli._table(('STEP', 'TASK ID', 'STATE', 'ERROR'), rows) \
        .splitlines()[1].endswith('on and on')


def test_width_follows_columns_and_wide(monkeypatch):
    monkeypatch.setenv('COLUMNS', '100')
    assert cli._width(False) == 100 and cli._width(True) is None
    monkeypatch.delenv('COLUMNS')
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: False)
    assert cli._width(False) is None                # piped: full text
