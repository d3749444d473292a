"""docs/state-machine.md stays true to the code and the tests: every row of
its transition tables cites a test that exists (or says it is a hole), and
every Lua command it names exists.

Test modules are parsed with ``ast``, never imported.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / 'docs' / 'state-machine.md'
LUA = ROOT / 'celery_compensate' / 'store' / 'lua'

#: the columns of every transition table, in order
COLUMNS = ['state', 'event', 'next state', 'effects', 'test']

#: ``tests/<dir>/<file>.py::<test_function>``, optionally `` [param-id]``
CITATION = re.compile(
    r'(?P<path>tests/[\w/]+\.py)::(?P<function>test_\w+)'
    r'(?:\s+\[(?P<param>[^\]]+)\])?')
MARK = re.compile(r'\*\*(HOLE|WRONG)\*\*:\s*\S')
#: a Lua command named in the doc
COMMAND = re.compile(r'celery_compensate/store/lua/(?P<name>\w+)\.lua')


def split_row(line: str) -> list[str]:
    """The cells of one Markdown table row (``\\|`` is a literal bar)."""
    body = line.strip()
    assert body.startswith('|') and body.endswith('|'), line
    cells = re.split(r'(?<!\\)\|', body[1:-1])
    return [cell.strip() for cell in cells]


def transition_rows() -> list[tuple[int, dict[str, str]]]:
    """(line number, cells by column) of every row of every table whose
    header is :data:`COLUMNS`."""
    rows: list[tuple[int, dict[str, str]]] = []
    lines = DOC.read_text(encoding='utf-8').splitlines()
    header = None
    for number, line in enumerate(lines, 1):
        if not line.lstrip().startswith('|'):
            header = None
            continue
        cells = split_row(line)
        if header is None:
            header = cells
            continue
        if all(re.fullmatch(r':?-+:?', c) for c in cells):
            continue            # the separator under the header
        if header != COLUMNS:
            continue            # another table (the list of commands)
        assert len(cells) == len(COLUMNS), (
            f'{DOC.name}:{number}: {len(cells)} cells, expected '
            f'{len(COLUMNS)}: {line}')
        rows.append((number, dict(zip(COLUMNS, cells, strict=True))))
    return rows


@lru_cache(maxsize=None)
def defined_tests(path: str) -> frozenset[str]:
    """Top-level ``def test_...`` of a test file, read with ``ast``."""
    tree = ast.parse((ROOT / path).read_text(encoding='utf-8'), path)
    return frozenset(
        node.name for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith('test_'))


@lru_cache(maxsize=None)
def source(path: str) -> str:
    return (ROOT / path).read_text(encoding='utf-8')


def test_the_doc_has_the_three_machines():
    text = DOC.read_text(encoding='utf-8')
    for title in ('## The saga', '## Past a pivot', '## A forward step',
                  '## An undo attempt', '## Holes'):
        assert f'\n{title}\n' in text, title
    tables = text.count('| state | event | next state | effects | test |')
    assert tables == 5
    assert len(transition_rows()) > 100


def test_every_row_is_filled_and_cites_a_test_or_names_a_hole():
    problems = []
    for number, row in transition_rows():
        empty = [c for c in COLUMNS if not row[c]]
        if empty:
            problems.append(f'line {number}: empty {", ".join(empty)}')
        test = row['test']
        if not CITATION.search(test) and not MARK.search(test):
            problems.append(f'line {number}: no test cited and no '
                            f'**HOLE**/**WRONG** mark: {test!r}')
    assert not problems, '\n'.join(problems)


def test_every_cited_test_exists():
    problems = []
    for number, row in transition_rows():
        for m in CITATION.finditer(row['test']):
            path, function, param = m['path'], m['function'], m['param']
            if not (ROOT / path).is_file():
                problems.append(f'line {number}: no file {path}')
                continue
            if function not in defined_tests(path):
                problems.append(f'line {number}: no top-level {function} '
                                f'in {path}')
            elif param and param not in source(path):
                problems.append(f'line {number}: parameter id {param!r} not '
                                f'found in {path}')
    assert not problems, '\n'.join(problems)


def test_every_hole_is_listed_under_holes():
    """The Holes section lists each marked row once, in table order, with
    the same mark."""
    text = DOC.read_text(encoding='utf-8')
    holes = text.split('\n## Holes\n', 1)[1]
    listed = re.findall(r'^- \*\*(HOLE|WRONG)\*\* (.*)$', holes, re.MULTILINE)
    marked = [(MARK.search(row['test'])[1], row)
              for _, row in transition_rows() if MARK.search(row['test'])]
    assert [kind for kind, _ in listed] == [kind for kind, _ in marked]
    for (_, entry), (_, row) in zip(listed, marked, strict=True):
        assert f"{row['state']} \N{MULTIPLICATION SIGN} {row['event']}:" in entry, entry


def test_every_lua_command_named_exists():
    names = set(COMMAND.findall(DOC.read_text(encoding='utf-8')))
    assert names >= {'start', 'step_done', 'step_failed', 'undo_begin',
                     'undo_release', 'undo_done', 'undo_failed', 'renew',
                     'recover', 'abort', 'retry', 'scan'}
    if not LUA.is_dir():
        pytest.skip(f'{LUA.relative_to(ROOT)} does not exist yet')
    missing = sorted(n for n in names if not (LUA / f'{n}.lua').is_file())
    assert not missing, f'named in {DOC.name} but not in {LUA}: {missing}'
