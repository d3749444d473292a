"""The Lua commands as files: assembled with only the helpers they use,
registered once (healing NOSCRIPT), errors named by file and line, and
every field they spell named in the layout module."""
from __future__ import annotations

import re
from importlib import resources

import pytest

from celery_compensate import SagaStoreError
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef, UndoSpec
from celery_compensate.store import Reply
from celery_compensate.store import layout as L
from celery_compensate.store.scripts import COMMANDS, assemble, explain

LUA = resources.files('celery_compensate.store').joinpath('lua')


def _plan() -> Plan:
    return Plan.from_stages([[(TaskRef('a'), UndoSpec('u'), False)],
                             [(TaskRef('b'), UndoSpec('u'), False)]])


def test_every_command_is_a_file_with_a_header():
    files = sorted(p.name[:-4] for p in LUA.iterdir()
                   if p.name.endswith('.lua'))
    assert files == sorted(COMMANDS)
    for name in COMMANDS:
        text = LUA.joinpath(f'{name}.lua').read_text()
        assert text.startswith('--- '), name
        header = text.split('\n\n')[0]
        assert 'KEYS[' in header and 'ARGV[' in header, name


def test_a_command_carries_only_the_helpers_it_includes():
    defined = re.compile(r'^local function (\w+)', re.M)
    renew = defined.findall(assemble('renew').text)
    assert 'late_undo' not in renew and 'advance' not in renew
    for name in COMMANDS:
        names = defined.findall(assemble(name).text)
        assert len(names) == len(set(names)), name   # each helper once


def test_the_common_case_of_step_done_runs_before_the_rare_helpers():
    text = assemble('step_done').text
    common = text.index("local reply = next_stage(set)")
    for helper in ('advance', 'late_undo', 'replay', 'rescore'):
        assert text.index(f'local function {helper}(') > common, helper


def test_every_field_a_command_spells_is_named_in_the_layout():
    step = set(L.STEP_FIELDS.values()) | set(L.STAGE_FIELDS.values())
    saga = set(L.SAGA_FIELDS)
    for name in COMMANDS:
        text = assemble(name).text
        for prefix in re.findall(r"'([a-z]{1,2})' \.\.", text):
            assert prefix in step, (name, prefix)
        for field in re.findall(
                r"(?:hget|num)\('([a-z]+)'\)|'HGET', h, '([a-z]+)'\)", text):
            assert (field[0] or field[1]) in saga, (name, field)


def test_every_status_a_command_returns_is_a_reply():
    values = {r.value for r in Reply}
    for name in COMMANDS:
        text = assemble(name).text
        for status in re.findall(r"return \{?'([a-z-]+)'", text):
            assert status in values, (name, status)
        for status in re.findall(r"(?:replay|return)\('([a-z-]+)'", text):
            assert status in values, (name, status)


def test_an_error_inside_a_command_names_its_file_and_line(celery_app, rds):
    store = get_state(celery_app).store
    assert store.create('e', _plan())
    store.step_done('e', 0, '"a"')
    rds.hset(store.keys.saga('e'), L.undo_lease(0), 'not a number')
    with pytest.raises(SagaStoreError) as info:
        # the undo made due reads its lease in the failure's open_stage
        store.step_failed('e', 1, 'boom')
    message = str(info.value)
    assert 'user_script' not in message, message
    assert re.search(r'includes/undo_wait\.lua:\d+ \(in step_failed\)',
                     message), message
    line = int(re.search(r'undo_wait\.lua:(\d+)', message).group(1))
    source = LUA.joinpath('includes', 'undo_wait.lua').read_text()
    assert "hget('ou' .. i)" in source.splitlines()[line - 1]


def test_explain_leaves_other_errors_alone():
    assert explain('ERR unknown command', {}) == 'ERR unknown command'


def test_scripts_are_loaded_again_after_a_script_flush(celery_app, rds):
    """NOSCRIPT (a Redis restart empties the script cache) heals itself."""
    store = get_state(celery_app).store
    assert store.create('f', _plan())
    rds.script_flush()
    assert store.step_done('f', 0, '"a"').status is Reply.NEXT
    assert store.step_done('f', 1, '"b"').status is Reply.COMPLETED
