"""``celery -A app compensate ...`` run as a real command (loaded through
the ``celery.commands`` entry point) against a live prefork worker, and the
same operations on ``SagaResult``."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
from celery import Celery

from celery_compensate import SagaNotFound, SagaResult, SagaState, install, saga
from celery_compensate.cli import EXIT_NOT_FOUND, EXIT_WRONG_STATE
from celery_compensate.appstate import get_state
from celery_compensate.store import layout as L
from celery_compensate.testing import WorkerProcess, delete_keys, free_port

from .. import tasks
from ..helpers import wait_for
from ..helpers import undone

pytestmark = pytest.mark.prefork
ROOT = Path(__file__).resolve().parents[2]


class Env:
    """A producer app, a prefork worker and the CLI, sharing one config."""

    def __init__(self, redis_url: str) -> None:
        self.prefix = f'cctest-cli-{uuid.uuid4().hex[:8]}'
        self.env = {
            'COMPENSATE_TEST_BROKER': redis_url,
            'COMPENSATE_TEST_PREFIX': self.prefix,
            'COMPENSATE_TEST_QUEUE': f'{self.prefix}-q',
            'COMPENSATE_TEST_UNDO_MAX_ATTEMPTS': '2',
            'COMPENSATE_TEST_FORWARD_MAX_ATTEMPTS': '2',
        }
        self.app = Celery('cli-producer', broker=redis_url,
                          set_as_current=False)
        self.app.conf.update(compensate_key_prefix=self.prefix,
                             task_default_queue=f'{self.prefix}-q',
                             compensate_undo_max_attempts=2,
                             compensate_forward_max_attempts=2)
        install(self.app)
        self.rds = redis.Redis.from_url(redis_url, decode_responses=True)
        self.worker = WorkerProcess(
            'tests.prefork_app', self.env, '-P', 'prefork', '-c', '2', '-Q',
            f'{self.prefix}-q', name='cli', cwd=ROOT)

    def cli(self, *args: str, app: str = 'tests.prefork_app',
            **env: str) -> subprocess.CompletedProcess:
        """Run ``celery -A <app> compensate <args>``."""
        return subprocess.run(
            [sys.executable, '-m', 'celery', '-A', app, 'compensate', *args],
            cwd=ROOT, env={**os.environ, **self.env, **env},
            capture_output=True, text=True, timeout=60)

    def cli_json(self, *args: str) -> tuple[int, object]:
        proc = self.cli(*args, '--json')
        return proc.returncode, json.loads(proc.stdout)

    def start(self, *steps, **options) -> SagaResult:
        return saga(*steps, app=self.app).apply_async(**options)

    def fail_undo(self, saga_id: str, name: str, times: int) -> None:
        """Make the undo of step ``name`` fail its next ``times`` runs."""
        self.rds.set(tasks.countdown_key(self.app, saga_id, name), times)

    def compensation_failed(self) -> SagaResult:
        """a, b done; c fails; the undo of b succeeds, a's fails twice."""
        sid = f'cf-{uuid.uuid4().hex[:8]}'
        self.fail_undo(sid, 'a', 100)
        res = self.start(tasks.do.si('a'), tasks.do.si('b'),
                         tasks.do.si('c', fail=True), saga_id=sid)
        assert res.wait(timeout=30) is SagaState.COMPENSATION_FAILED
        return res


@pytest.fixture(scope='module')
def env(redis_url: str) -> Iterator[Env]:
    e = Env(redis_url)
    e.worker.start()
    try:
        yield e
    finally:
        e.worker.stop()
        delete_keys(e.rds, f'{e.prefix}*')
        e.rds.close()
        e.app.close()


def columns(line: str, header: str) -> list[str]:
    """Split a table line at its header's column starts (a header word
    after two spaces): values only land in the right column if aligned."""
    starts = [m.start() for m in re.finditer(r'(?:^|(?<=  ))\S', header)]
    return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]


def test_list_newest_first_filtered_and_limited(env):
    done = env.start(tasks.do.si('a'))
    assert done.wait(timeout=30) is SagaState.COMPLETED
    failed = env.compensation_failed()
    running = env.start(tasks.do.si('a'), tasks.do.si('b', sleep=20))
    wait_for(lambda: running.steps[1].state.name == 'RUNNING', timeout=15)

    proc = env.cli('list')
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert columns(header, header) == ['SAGA ID', 'STATE', 'AGE', 'CURRENT']
    table = [columns(row, header) for row in rows]
    mine = [r for r in table if r[0] in (done.id, failed.id, running.id)]
    # newest first, each column starting under its header
    assert [r[0] for r in mine] == [running.id, failed.id, done.id]
    assert [r[1] for r in mine] == [
        'RUNNING', 'COMPENSATION_FAILED', 'COMPLETED']
    assert mine[0][3] == 'step 1 t.do running'
    assert mine[1][3].startswith('undo of step 0 t.undo failed after 2 '
                                 'attempts: RuntimeError')
    assert mine[2][3] == '-'

    code, data = env.cli_json('list', '--state', 'compensation_failed')
    assert code == 0
    assert [d['saga_id'] for d in data] == [failed.id]
    assert data[0]['state'] == 'COMPENSATION_FAILED' and data[0]['age'] >= 0
    code, data = env.cli_json('list', '--limit', '1')
    assert code == 0 and [d['saga_id'] for d in data] == [running.id]
    assert env.cli('list', '--state', 'NOPE').returncode == 2

    env.cli('abort', running.id)
    assert running.wait(timeout=30) is SagaState.COMPENSATED


def test_list_pages_past_its_limit(env):
    first = env.start(tasks.do.si('a'))
    second = env.start(tasks.do.si('a'))
    assert second.wait(timeout=30) is SagaState.COMPLETED
    assert first.wait(timeout=30) is SagaState.COMPLETED
    proc = env.cli('list', '--limit', '1', '--state', 'completed')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[0] == second.id
    hint = ('more: celery compensate list --state COMPLETED --limit 1 '
            f'--before {second.id}')
    assert hint in proc.stderr
    code, data = env.cli_json('list', '--limit', '1', '--state', 'completed',
                              '--before', second.id)
    assert code == 0 and [d['saga_id'] for d in data] == [first.id]
    assert env.cli('list', '--before', 'no such saga!').returncode == 2


def test_show_fits_the_terminal_unless_wide(env):
    res = env.compensation_failed()
    narrow = env.cli('show', res.id, COLUMNS='80')
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    assert '...' in narrow.stdout
    wide = env.cli('show', res.id, '--wide', COLUMNS='80')
    assert max(len(line) for line in wide.stdout.splitlines()) > 80
    assert '\x1b[' not in wide.stdout          # not a terminal: no colour


def test_show_prints_plan_timings_results_and_undo_attempts(env):
    res = env.compensation_failed()
    proc = env.cli('show', res.id)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f'saga     {res.id}' in text
    assert 'state    COMPENSATION_FAILED' in text
    assert 'reason   ValueError: c failed on purpose' in text
    assert 'failed   step 2 t.do' in text
    lines = text.splitlines()
    steps_at = next(n for n, line in enumerate(lines)
                    if line.startswith('STEP '))
    step_rows = [columns(line, lines[steps_at])
                 for line in lines[steps_at + 1:steps_at + 4]]
    assert [r[:5] for r in step_rows] == [
        ['0', '0', 't.do', f'{res.id}.s0', 'DONE'],
        ['1', '1', 't.do', f'{res.id}.s1', 'DONE'],
        ['2', '2', 't.do', f'{res.id}.s2', 'FAILED']]
    assert step_rows[0][7] == '"res-a"' and step_rows[1][7] == '"res-b"'
    assert all(r[5].startswith('+') and r[6].endswith('s') for r in step_rows)
    undos_at = next(n for n, line in enumerate(lines)
                    if line.startswith('UNDO OF'))
    undo_rows = {r[0]: r for r in (columns(line, lines[undos_at])
                                   for line in lines[undos_at + 1:])}
    # in the order they ran: step 1's undo, then step 0's
    assert list(undo_rows) == ['1', '0']
    assert undo_rows['0'][1:5] == ['t.undo', f'{res.id}.u0.2', 'FAILED', '2']
    assert undo_rows['0'][7].startswith('RuntimeError: undo of a failed')
    assert undo_rows['1'][1:5] == ['t.undo', f'{res.id}.u1.1', 'DONE', '1']

    code, data = env.cli_json('show', res.id)
    assert code == 0
    assert data['state'] == 'COMPENSATION_FAILED'
    assert data['failed_step'] == 2
    steps = data['steps']
    assert [s['result'] for s in steps[:2]] == ['res-a', 'res-b']
    assert steps[0]['undo_attempts'] == 2 and steps[0]['undo_state'] == 'FAILED'
    assert 'undo of a failed on purpose' in steps[0]['undo_error']
    assert steps[2]['state'] == 'FAILED' and steps[2]['undo_attempts'] == 0


def test_retry_redrives_from_the_failed_undo_only(env):
    res = env.compensation_failed()
    def log() -> list[str]:
        return env.rds.lrange(tasks.ledger_key(env.app, res.id), 0, -1)

    assert undone(log()) == ['b']
    env.fail_undo(res.id, 'a', 0)     # the cause is fixed

    proc = env.cli('retry', res.id)
    assert proc.returncode == 0, proc.stderr
    assert f'saga {res.id}: COMPENSATION_FAILED -> COMPENSATING' in proc.stdout
    assert f'step 0 t.undo attempt 3 ({res.id}.u0.3)' in proc.stdout
    assert res.wait(timeout=30) is SagaState.COMPENSATED
    assert undone(log()) == ['b', 'a']   # b's finished undo not repeated
    info = res.info()
    assert info.retries == 1 and info.steps[0].undo_attempts == 3

    # a saga in another state: nothing changes, and it says why
    proc = env.cli('retry', res.id)
    assert proc.returncode == EXIT_WRONG_STATE
    assert (f'saga {res.id} is COMPENSATED, not COMPENSATION_FAILED or '
            'FORWARD_FAILED: cannot '
            'retry it; nothing was changed') in proc.stderr
    assert res.state is SagaState.COMPENSATED and undone(log()) == ['b', 'a']


def test_retry_imports_the_apps_task_modules(env):
    """The undos a retry sends must be tasks of the app: the command
    imports the app's ``include`` modules as a worker would."""
    res = env.compensation_failed()
    env.fail_undo(res.id, 'a', 0)
    proc = env.cli('retry', res.id, app='tests.include_app')
    assert proc.returncode == 0, proc.stderr
    assert res.wait(timeout=30) is SagaState.COMPENSATED


def test_a_retry_refused_at_once_is_an_error(env):
    """An app without the undo task refuses to send it: the saga is
    COMPENSATION_FAILED again, and the command says so and fails."""
    res = env.compensation_failed()
    proc = env.cli('retry', res.id, app='tests.include_app',
                   COMPENSATE_TEST_NO_TASKS='1')
    assert proc.returncode == 1
    assert f'saga {res.id} is COMPENSATION_FAILED again at once' in proc.stderr
    assert "names 't.undo', which a saga may not run here" in proc.stderr
    assert res.state is SagaState.COMPENSATION_FAILED


def test_retry_gives_a_fresh_budget_and_can_fail_again(env):
    res = env.compensation_failed()
    code, data = env.cli_json('retry', res.id)    # still failing
    assert code == 0 and data['undos'] == [{
        'step': 0, 'task': 't.undo', 'attempt': 3,
        'task_id': f'{res.id}.u0.3'}]
    wait_for(lambda: res.steps[0].undo_attempts == 4, timeout=30)
    assert res.wait(timeout=30) is SagaState.COMPENSATION_FAILED
    assert res.steps[0].undo_attempts == 4      # two more: a fresh budget


def test_a_forward_failed_saga_is_shown_and_retried_forward(env):
    """Past its pivot, ship spends its 2 attempts: FORWARD_FAILED, shown
    with the pivot and the attempts; retry publishes ship again (a fresh
    budget) and the saga completes, nothing undone."""
    res = env.start(tasks.do.si('reserve'),
                    tasks.do.si('capture').set(compensate_pivot=True),
                    tasks.forward.si('ship', fail_times=3))
    assert res.wait(timeout=30) is SagaState.FORWARD_FAILED
    proc = env.cli('show', res.id, '--wide', '--no-color')
    assert proc.returncode == 0, proc.stderr
    assert 'state    FORWARD_FAILED' in proc.stdout
    assert 't.do (pivot)' in proc.stdout
    assert 't.forward (attempt 2)' in proc.stdout
    code, data = env.cli_json('list', '--state', 'FORWARD_FAILED')
    assert code == 0 and res.id in [e['saga_id'] for e in data]

    proc = env.cli('retry', res.id)
    assert proc.returncode == 0, proc.stderr
    assert f'saga {res.id}: FORWARD_FAILED -> RUNNING; steps sent again:' \
        in proc.stdout
    assert f'step 2 t.forward ({res.id}.s2.3)' in proc.stdout  # its own id
    assert res.wait(timeout=30) is SagaState.COMPLETED
    log = env.rds.lrange(tasks.ledger_key(env.app, res.id), 0, -1)
    assert log.count('start:ship') == 4 and undone(log) == []


def test_abort_stops_a_running_saga_and_refuses_a_finished_one(env):
    res = env.start(tasks.do.si('a'), tasks.do.si('b', sleep=20),
                    tasks.do.si('c'))
    wait_for(lambda: res.steps[1].state.name == 'RUNNING', timeout=15)
    code, data = env.cli_json('abort', res.id, '--reason', 'wrong price')
    assert code == 0, data
    assert data['old_state'] == 'RUNNING' and data['revoked_steps'] == [1]
    assert res.wait(timeout=30) is SagaState.COMPENSATED
    assert res.info().reason == 'aborted: wrong price'
    log = env.rds.lrange(tasks.ledger_key(env.app, res.id), 0, -1)
    assert undone(log) == ['a'] and 'start:c' not in log

    proc = env.cli('abort', res.id)
    assert proc.returncode == EXIT_WRONG_STATE
    assert 'is COMPENSATED, not RUNNING: cannot abort it; nothing was ' \
        'changed' in proc.stderr


@pytest.mark.parametrize('command', ['show', 'retry', 'abort'])
def test_an_unknown_saga_has_its_own_exit_code(env, command):
    proc = env.cli(command, 'no-such-saga')
    assert proc.returncode == EXIT_NOT_FOUND
    assert "saga 'no-such-saga' not found" in proc.stderr
    code, data = env.cli_json(command, 'no-such-saga')
    assert code == EXIT_NOT_FOUND
    assert data['error'] == 'not-found' and data['saga_id'] == 'no-such-saga'


def test_bad_input_and_an_unreachable_store_are_other_errors(env):
    proc = env.cli('show', 'not a saga id!')
    assert proc.returncode == 2 and "Invalid value for 'SAGA_ID'" in proc.stderr
    dead = f'redis://127.0.0.1:{free_port()}/0'
    proc = env.cli('list', COMPENSATE_TEST_BROKER=dead)
    assert proc.returncode == 1
    assert 'is unreachable' in proc.stderr and dead in proc.stderr


def test_the_same_operations_on_saga_result(env):
    res = env.compensation_failed()
    assert [s.state.name for s in res.steps] == ['DONE', 'DONE', 'FAILED']
    assert [s.task_id for s in res.steps] == [
        f'{res.id}.s{i}' for i in range(3)]
    assert res.abort() is False           # not running: nothing changes
    assert res.state is SagaState.COMPENSATION_FAILED
    env.fail_undo(res.id, 'a', 0)
    assert res.retry() is True
    assert res.wait(timeout=30) is SagaState.COMPENSATED
    assert res.retry() is False

    ghost = SagaResult('no-such-saga', app=env.app)
    for call in (lambda: ghost.steps, ghost.retry, ghost.abort):
        with pytest.raises(SagaNotFound, match="'no-such-saga' not found"):
            call()


def test_show_draws_the_tree_of_nested_sagas_and_list_can_hide_them(env):
    res = env.start(tasks.do.si('a'),
                    saga(tasks.do.si('b'), saga(tasks.do.si('c'), app=env.app),
                         app=env.app),
                    tasks.do.si('d', fail=True))
    assert res.wait(timeout=30) is SagaState.COMPENSATED
    child, grandchild = f'{res.id}~1', f'{res.id}~1~1'

    proc = env.cli('show', res.id)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index('nested')
    assert lines[at + 1:at + 3] == [
        f'  └─ step 1: {child} COMPENSATED',
        f'     └─ step 1: {grandchild} COMPENSATED']
    assert any(line.split()[:3] == ['1', '1', 'saga'] and child in line
               for line in lines)
    code, data = env.cli_json('show', res.id)
    assert code == 0
    assert data['children'][0]['saga_id'] == child
    assert data['children'][0]['children'][0]['state'] == 'COMPENSATED'

    proc = env.cli('show', grandchild)
    assert proc.returncode == 0, proc.stderr
    assert f'parent   {child} (its step 1)' in proc.stdout

    code, data = env.cli_json('list', '--limit', '20')
    ids = [d['saga_id'] for d in data]
    assert {res.id, child, grandchild} <= set(ids)
    running = env.start(tasks.do.si('a'),
                        saga(tasks.do.si('b', sleep=20), app=env.app))
    key = get_state(env.app).store.keys.saga(f'{running.id}~1')
    wait_for(lambda: env.rds.hget(key, L.step_state(0)) == 'R', timeout=15)
    code, data = env.cli_json('list', '--state', 'RUNNING', '--no-children')
    mine = [d for d in data if d['saga_id'] == running.id]
    assert mine[0]['current'] == (f'step 1 nested saga {running.id}~1 '
                                  'running')
    env.cli('abort', running.id)
    assert running.wait(timeout=30) is SagaState.COMPENSATED
    code, data = env.cli_json('list', '--limit', '20', '--no-children')
    ids = [d['saga_id'] for d in data]
    assert res.id in ids and child not in ids and grandchild not in ids
