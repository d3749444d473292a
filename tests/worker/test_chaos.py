"""The chaos suite (``tests/chaos.py``): its checker on made-up ledgers, and
the short run (30 sagas, every fault) against real prefork workers and a
Redis it kills."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from celery_compensate.model import SagaState, StepState, UndoState

from ..tools.chaos import ALL_FAULTS, MUST_BE_ZERO, Attempt, Plan, analyse

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(
    r'^chaos: (?P<sagas>\d+) sagas, (?P<steps>\d+) steps, faults '
    r'(?P<faults>\d+), final (?P<final>\d+)/(?P<total>\d+), double-undo '
    r'(?P<double>\d+), missing-undo (?P<missing>\d+), wrong-order '
    r'(?P<order>\d+), lost (?P<lost>\d+), stranded (?P<stranded>\d+), '
    r'healthy-compensated (?P<healthy>\d+)', re.MULTILINE)


# -- the checker ---------------------------------------------------------------

def _attempt(stages, undo=None):
    plan = Plan(0, stages, undo=dict(undo or {}))
    return Attempt(7, plan, 'sid-7', acked=True)


def _record(state, steps, compensation_started=None, settled_at=None):
    """steps: (StepState, UndoState) per step."""
    return SimpleNamespace(
        state=state, compensation_started=compensation_started, steps=[
            SimpleNamespace(index=i, state=s, undo_state=u,
                            settled_at=settled_at)
            for i, (s, u) in enumerate(steps)])


def _ledger(*events):
    """events: (kind, step); the undo entries carry the right key."""
    lines = []
    for kind, i in events:
        data = {'s': 7, 'i': i, 't': f'sid-7.s{i}', 'sid': 'sid-7',
                'pid': 1}
        if kind.startswith('undo'):
            data['idem'] = f'sid-7:{i}'
        lines.append(f'{kind} {json.dumps(data)}')
    return lines


def _effects(lines):
    fx: dict[str, int] = {}
    for line in lines:
        kind, _, payload = line.partition(' ')
        i = json.loads(payload)['i']
        if kind == 'do':
            fx[f'do:7:{i}'] = 'token'
        elif kind == 'undo':
            fx[f'undo:7:{i}'] = fx.get(f'undo:7:{i}', 0) + 1
    return fx


def _check(att, record, *events):
    lines = _ledger(*events)
    result = analyse([att], lines, _effects(lines), {att.sid: record})
    return {k: v for k, v in result.counts.items() if v}


D, F, P = StepState.DONE, StepState.FAILED, StepState.PENDING
UD, UN, UF = UndoState.DONE, UndoState.NONE, UndoState.FAILED
COMPENSATED = SagaState.COMPENSATED


def test_checker_accepts_a_correct_compensation():
    att = _attempt([[0], [1, 2], [3]])
    rec = _record(COMPENSATED, [(D, UD), (D, UD), (F, UD), (P, UN)])
    assert _check(att, rec, ('start', 0), ('do', 0), ('start', 1), ('do', 1),
                  ('start', 2), ('undo-start', 2), ('undo-noop', 2),
                  ('undo-start', 1), ('undo', 1), ('undo-start', 0),
                  ('undo', 0)) == {}


@pytest.mark.parametrize('events, expected', [
    # step 0 never undone
    ([('do', 0), ('do', 1), ('undo-start', 1), ('undo', 1)],
     {'missing-undo': 1}),
    # undone twice
    ([('do', 0), ('do', 1), ('undo-start', 1), ('undo', 1),
      ('undo-start', 1), ('undo', 1), ('undo-start', 0), ('undo', 0)],
     {'double-undo': 1}),
    # stage 0 undone before stage 1
    ([('do', 0), ('do', 1), ('undo-start', 0), ('undo', 0),
      ('undo-start', 1), ('undo', 1)], {'wrong-order': 1}),
    # the forward effect came after its undo ran
    ([('do', 0), ('undo-start', 1), ('undo-noop', 1), ('do', 1),
      ('undo-start', 0), ('undo', 0)], {'missing-undo': 1}),
])
def test_checker_counts_broken_compensations(events, expected):
    att = _attempt([[0], [1], [2]])
    rec = _record(COMPENSATED, [(D, UD), (D, UD), (F, UN)])
    assert _check(att, rec, *events) == expected


def test_checker_flags_lost_and_unexpected_states():
    att = _attempt([[0], [1]])
    assert _check(att, None, ('do', 0)) == {'lost': 1}
    # COMPENSATION_FAILED without an undo that never recovers
    rec = _record(SagaState.COMPENSATION_FAILED, [(D, UF), (F, UN)])
    assert _check(att, rec, ('do', 0), ('undo-start', 0)) == {
        'cf-unexpected': 1}
    # with one: expected; stage 0 waits, so nothing is missing
    att = _attempt([[0], [1], [2]], undo={1: 'never'})
    rec = _record(SagaState.COMPENSATION_FAILED,
                  [(D, UN), (D, UF), (F, UD)])
    assert _check(att, rec, ('do', 0), ('do', 1), ('undo-start', 2),
                  ('undo-noop', 2), ('undo-start', 1), ('undo-fail', 1)) == {}
    # a COMPLETED saga with an undo run, and a step without its effect
    rec = _record(SagaState.COMPLETED, [(D, UN), (D, UN), (D, UN)])
    assert _check(att, rec, ('do', 0), ('do', 1), ('undo-start', 1)) == {
        'completed-bad': 1, 'undo-not-due': 1}
    # an undo run under another idempotency key
    rec = _record(COMPENSATED, [(D, UD), (F, UN), (P, UN)])
    lines = _ledger(('do', 0), ('undo-start', 0), ('undo', 0))
    lines[1] = lines[1].replace('sid-7:0', 'sid-7:9')
    assert analyse([att], lines, _effects(lines),
                   {att.sid: rec}).counts['bad-idem'] == 1


def test_checker_counts_an_undo_past_a_completed_pivot():
    """Stage 1 is the pivot: recorded done (at t=10) before compensation
    began (t=20), nothing may be undone and the saga must complete."""
    att = _attempt([[0], [1], [2]])
    att.plan.pivot = 1
    events = [('do', 0), ('do', 1), ('start', 2), ('undo-start', 0),
              ('undo', 0)]
    rec = _record(COMPENSATED, [(D, UD), (D, UN), (F, UN)],
                  compensation_started=20.0, settled_at=10.0)
    assert _check(att, rec, *events) == {'forward-undone': 1,
                                         'missing-undo': 1}
    # FORWARD_FAILED (or anything but COMPLETED) past the pivot
    rec = _record(SagaState.FORWARD_FAILED, [(D, UN), (D, UN), (F, UN)],
                  settled_at=10.0)
    assert _check(att, rec, ('do', 0), ('do', 1), ('start', 2)) == {
        'forward-undone': 1}
    # a pivot that completed only after compensation began (it was taken
    # for lost) is no point of no return: compensating is right
    rec = _record(COMPENSATED, [(D, UD), (D, UD), (F, UN)],
                  compensation_started=20.0, settled_at=30.0)
    assert _check(att, rec, ('do', 0), ('do', 1), ('undo-start', 1),
                  ('undo', 1), ('undo-start', 0), ('undo', 0)) == {}


# -- the short run ---------------------------------------------------------------

@pytest.mark.prefork
def test_chaos_short_run(tmp_path):
    """30 sagas with every fault: all final, nothing undone twice, missed,
    out of order or lost."""
    if not shutil.which('redis-server'):
        pytest.skip('the chaos suite needs redis-server on PATH: it runs its '
                    'own Redis with AOF and kill -9s it')
    out = tmp_path / 'chaos.json'
    seed = os.environ.get('CHAOS_SEED') or str(
        int.from_bytes(os.urandom(4), 'big') >> 1)
    cmd = [sys.executable, '-m', 'tests.tools.chaos', '--sagas', '30', '--seed',
           seed, '--faults', ','.join(ALL_FAULTS), '--wide', '0',
           '--json', str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    output = f'seed {seed}\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}'
    assert proc.returncode == 0, output
    match = SUMMARY.search(proc.stdout)
    assert match, output
    assert match['sagas'] == match['final'] == match['total'] == '30', output
    assert (match['double'], match['missing'], match['order'],
            match['lost'], match['stranded'], match['healthy']) == (
                '0', '0', '0', '0', '0', '0'), output
    result = json.loads(out.read_text())
    assert result['ok'] and result['final'] == result['sagas'] == 30, output
    assert {k: v for k, v in result['counts'].items() if v} == {}, output
    assert set(result['counts']) == set(MUST_BE_ZERO)
    assert result['compensation_failed'] == result['expected_cf'], output
    assert result['faults'] > 0, output


def test_a_nested_range_maps_each_logical_step_to_its_saga():
    """The checker reads a nested saga's steps where the library put them:
    the child ``<sid>~<first>`` numbers them from 0, the outer saga's
    later steps shift down by the range's size minus one."""
    plan = Plan(0, [[0], [1, 2], [3], [4]], nest=(1, 2))
    assert plan.nested_steps() == (1, 3)
    assert [plan.where('s', i) for i in range(5)] == [
        ('s', 0), ('s~1', 0), ('s~1', 1), ('s~1', 2), ('s', 2)]
    assert Plan(0, [[0], [1]]).where('s', 1) == ('s', 1)
