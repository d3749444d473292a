"""The test kit (celery_compensate.contrib.pytest) against a real Redis and
a real in-process worker: the fixtures, fault injection and assert_trail.
"""
from __future__ import annotations

import os
import textwrap
import time

import pytest
from celery import group, shared_task
from celery.exceptions import WorkerLostError

from celery_compensate import SagaResult, SagaState, saga
from celery_compensate.appstate import get_state
from celery_compensate.contrib.pytest import (
    ANY, InjectedFailure, InjectionNotSupported, any_order, assert_trail,
    trail,
)

from . import kit_app
from .kit_app import (
    book, charge, flaky_lookup, invoice, mail, reserve,
)

pytest_plugins = ('pytester',)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
ORDER = [('do', 'reserve', (7, 2)), ('do', 'charge', ('res-7', 7))]


@pytest.fixture
def compensate_celery_app():
    return kit_app.app


def three_steps() -> SagaResult:
    return saga(reserve.s(7, 2), charge.s(7), mail.s(7)).apply_async()


# -- the app and the worker ---------------------------------------------------

def test_a_passing_saga_is_recorded_step_by_step(compensate_worker):
    res = three_steps()
    runs = assert_trail(res, [*ORDER, ('do', 'mail', ('pay-7', 7))],
                        state='COMPLETED')
    assert [r.outcome for r in runs] == ['ok', 'ok', 'ok']
    assert res.get(timeout=5) == 'mailed 7'


def test_the_users_app_is_pointed_at_the_test_redis_and_put_back(
        compensate_app, compensate_redis_url):
    state = get_state(compensate_app)
    assert compensate_app.conf.broker_url == compensate_redis_url
    assert state.settings.redis_url == compensate_redis_url
    assert state.settings.key_prefix.startswith('cctest-')
    assert state.settings.step_timeout == 6
    assert state.settings.heartbeat_interval == 1
    # the app's own settings that the kit does not set are kept
    assert state.settings.undo_max_attempts == 3


def test_after_a_test_the_app_has_its_own_configuration_again():
    # runs after the test above (in file order): nothing is left behind
    assert kit_app.app.conf.broker_url == 'redis://127.0.0.1:1/0'
    assert get_state(kit_app.app).settings.key_prefix == 'kit-app'


def test_keys_of_the_test_are_deleted_afterwards(pytester, redis_url,
                                                 monkeypatch):
    monkeypatch.setenv('COMPENSATE_TEST_REDIS_URL', redis_url)
    monkeypatch.setenv('PYTHONPATH', ROOT)
    pytester.makepyfile(test_inner=_INNER_PREAMBLE + textwrap.dedent('''
        from celery_compensate.appstate import get_state

        def test_inner(compensate_worker):
            res = saga(reserve.s(1, 1), charge.s(1)).apply_async()
            assert res.get(timeout=10) == 'pay-1'
            prefix = get_state(compensate_worker.app).settings.key_prefix
            open('prefix.txt', 'w').write(prefix)
    '''))
    result = pytester.runpytest_subprocess(
        '-p', 'no:cacheprovider', '-p', 'no:celery')
    result.assert_outcomes(passed=1)
    prefix = (pytester.path / 'prefix.txt').read_text()
    import redis
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(f'{prefix}*')) == []
    finally:
        client.close()


@pytest.mark.compensate_config(compensate_undo_max_attempts=2)
def test_compensate_config_marker(compensate_app):
    assert get_state(compensate_app).settings.undo_max_attempts == 2


def test_only_in_process_pools_are_accepted(pytester, redis_url,
                                            monkeypatch):
    monkeypatch.setenv('COMPENSATE_TEST_REDIS_URL', redis_url)
    monkeypatch.setenv('PYTHONPATH', ROOT)
    pytester.makepyfile(test_inner=_INNER_PREAMBLE + textwrap.dedent('''
        @pytest.fixture
        def compensate_worker_parameters():
            return {'pool': 'prefork'}

        def test_inner(compensate_worker):
            pass
    '''))
    result = pytester.runpytest_subprocess(
        '-p', 'no:cacheprovider', '-p', 'no:celery')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(['*compensate_worker runs the threads or '
                                 "solo pool, not 'prefork'*"])


# -- fault injection ------------------------------------------------------------

def test_fail_by_task_name_compensates_in_reverse(compensate_worker, inject):
    rule = inject.fail('mail')
    res = three_steps()
    runs = assert_trail(res, [
        *ORDER,
        ('do', 'mail', ('pay-7', 7)),
        ('undo', 'charge', ('pay-7', 'res-7', 7)),   # named by its step
        ('undo', 'release', ('res-7', 7, 2)),        # or by the undo task
    ], state=SagaState.COMPENSATED)
    assert rule.fired == 1
    assert runs[2].outcome == 'failed' and runs[2].injected == 'fail'
    assert res.steps[2].failure.startswith('InjectedFailure: injected by '
                                           "inject.fail('mail')")
    with pytest.raises(Exception):
        res.get(timeout=1)


def test_fail_by_step_index_and_by_full_name(compensate_worker, inject):
    inject.fail(1, PermissionError('card blocked'))
    res = three_steps()
    assert_trail(res, [*ORDER, ('undo', 'reserve', ...)],
                 state='COMPENSATED')
    assert res.steps[1].failure == 'PermissionError: card blocked'

    inject.fail('tests.contrib.kit_app.reserve', InjectedFailure)
    res = three_steps()
    assert_trail(res, [('do', 'reserve', (7, 2))], state='COMPENSATED')


def test_times_counts_runs_and_the_rule_runs_out(compensate_worker, inject):
    inject.fail('mail', times=1)
    first, second = three_steps(), None
    assert first.wait(10) is SagaState.COMPENSATED
    second = three_steps()
    assert second.wait(10) is SagaState.COMPLETED


def test_a_failing_undo_is_retried_and_every_attempt_is_in_the_trail(
        compensate_worker, inject):
    inject.fail('mail')
    inject.fail(('undo', 1), ConnectionError('gateway down'), times=2)
    res = three_steps()
    runs = assert_trail(res, [
        *ORDER, ('do', 'mail', ...),
        ('undo', 'refund', ('pay-7', 'res-7', 7)),
        ('undo', 'refund', ('pay-7', 'res-7', 7)),
        ('undo', 'refund', ('pay-7', 'res-7', 7)),
        ('undo', 'release', ('res-7', 7, 2)),
    ], state='COMPENSATED')
    assert [(r.attempt, r.outcome) for r in runs[3:6]] == [
        (1, 'failed'), (2, 'failed'), (3, 'ok')]
    assert res.steps[1].undo_attempts == 3


def test_an_undo_that_always_fails_ends_compensation_failed(
        compensate_worker, inject):
    inject.fail('mail')
    rule = inject.fail('refund', times=None)
    res = three_steps()
    assert_trail(res, [*ORDER, ('do', 'mail'),
                       *[('undo', 'refund', ...)] * 3],
                 state='COMPENSATION_FAILED')
    assert rule.fired == 3   # the app's compensate_undo_max_attempts


def test_injected_exception_goes_through_autoretry(compensate_worker, inject):
    inject.fail(flaky_lookup, ConnectionError('dns'), times=2)
    res = saga(flaky_lookup.s(4)).apply_async()
    runs = assert_trail(res, [('do', 'flaky_lookup', (4,))] * 3,
                        state='COMPLETED')
    assert [r.outcome for r in runs] == ['failed', 'failed', 'ok']
    assert res.get(timeout=5) == 40


def test_slow_delays_the_body(compensate_worker, inject):
    inject.slow('charge', 0.6)
    started = time.monotonic()
    res = three_steps()
    runs = assert_trail(res, [*ORDER, ('do', 'mail', ...)])
    assert time.monotonic() - started >= 0.6
    assert runs[1].injected == 'slow'


def test_worker_lost_as_a_failure(compensate_worker, inject):
    inject.fail('charge', WorkerLostError('child gone'))
    res = three_steps()
    assert_trail(res, [*ORDER, ('undo', 'reserve', ...)],
                 state='COMPENSATED')
    assert 'WorkerLostError' in res.steps[1].failure


def test_kill_child_is_refused_with_the_alternatives(compensate_worker,
                                                    inject):
    with pytest.raises(InjectionNotSupported, match='prefork') as info:
        inject.kill_child('charge')
    assert 'inject.fail(target, celery.exceptions.WorkerLostError)' in str(
        info.value)


@pytest.mark.parametrize('target, error', [
    ('chrage', "no task 'chrage'"),
    ('audit', "task name 'audit' is ambiguous: billing.audit, stock.audit"),
    (('redo', 1), 'not a target'),
    (-1, 'not a target'),
    (True, 'not a target'),
])
def test_bad_targets_are_refused_at_once(compensate_app, inject, target,
                                         error):
    with pytest.raises((ValueError, TypeError), match=error.replace(
            '(', r'\(')):
        inject.fail(target)


def test_rules_are_dropped_after_the_test(compensate_worker):
    # the rules of the tests above are gone: nothing fails
    assert three_steps().wait(10) is SagaState.COMPLETED


# -- assert_trail ------------------------------------------------------------------

def parallel_saga() -> SagaResult:
    return saga(reserve.s(7, 2), charge.s(7),
                group(book.si(7), invoice.si(7)),
                mail.s(7)).apply_async()


def test_any_order_for_a_parallel_stage(compensate_worker, inject):
    inject.fail('mail')
    res = parallel_saga()
    assert_trail(res, [
        *ORDER,
        any_order(('do', 'book', (7,)), ('do', 'invoice', (7,))),
        ('do', 'mail', (['ship-7', 'inv-7'], 7)),
        any_order(('undo', 'book', ('ship-7', 7)),
                  ('undo', 'void', ('inv-7', 7))),
        ('undo', 'charge', ...),
        ('undo', 'reserve', ...),
    ], state='COMPENSATED')


def test_wildcards(compensate_worker):
    res = three_steps()
    assert_trail(res, [('do', 'reserve', (ANY, 2)),
                       ('do', 'charge', ['res-7', ...]),
                       ('do', 'mail', ..., {})])
    assert_trail(res.id, [('do', 'tests.contrib.kit_app.reserve'),
                          ('do', 'charge', ('res-7', ANY), ...),
                          ('do', 'mail', (ANY, ANY))])


def test_a_mismatch_shows_both_trails_from_the_first_difference(
        compensate_worker, inject):
    inject.fail('mail')
    res = three_steps()
    with pytest.raises(AssertionError) as info:
        assert_trail(res, [*ORDER, ('do', 'mail', ...),
                           ('undo', 'reserve', ...),
                           ('undo', 'charge', ...)], state='COMPLETED')
    text = str(info.value)
    assert text.startswith(f'saga {res.id} (COMPENSATED): state COMPENSATED, '
                           'expected COMPLETED; runs differ from entry 3')
    assert ">  3  undo reserve(...)" in text
    assert ("   2  do   mail('pay-7', 7)  [step 2] -> failed: "
            'InjectedFailure') in text
    assert (">  3  undo refund('pay-7', 'res-7', 7)  [undo of step 1 charge, "
            'attempt 1] -> ok') in text


def test_extra_runs_are_a_difference(compensate_worker):
    res = three_steps()
    with pytest.raises(AssertionError, match='runs differ from entry 2'):
        assert_trail(res, ORDER)


def test_an_unfinished_saga_is_told_with_its_runs_so_far(compensate_worker,
                                                        inject):
    inject.slow('mail', 3)
    res = three_steps()
    with pytest.raises(AssertionError, match='did not finish within 0.5s') \
            as info:
        assert_trail(res, ORDER, timeout=0.5)
    assert 'do   reserve(7, 2)  [step 0] -> ok' in str(info.value)
    assert res.wait(10) is SagaState.COMPLETED
    assert [r.task for r in trail(res)][-1].endswith('mail')


def test_bad_expected_entries_are_refused(compensate_worker):
    res = three_steps()
    with pytest.raises(TypeError, match='an expected entry is'):
        assert_trail(res, [('run', 'reserve')])


# -- the default app (none of the user's) and the opt-in path ------------------

@shared_task
def shared_double(x: int) -> int:
    return 2 * x


class TestAFreshAppPerTest:
    @pytest.fixture
    def compensate_celery_app(self):
        return None

    def test_shared_tasks_run_on_a_fresh_app(self, compensate_worker):
        app = compensate_worker.app
        assert app is not kit_app.app and app.main == 'compensate_test'
        res = saga(shared_double.s(4), shared_double.s()).apply_async()
        assert_trail(res, [('do', 'shared_double', (4,)),
                           ('do', 'shared_double', (8,))])
        assert res.get(timeout=5) == 16


_INNER_PREAMBLE = textwrap.dedent('''
    import pytest
    from celery_compensate import saga
    from celery_compensate.contrib.pytest import assert_trail
    from tests.contrib.kit_app import reserve, charge

    pytest_plugins = ('celery_compensate.contrib.pytest',)

    @pytest.fixture
    def compensate_celery_app():
        from tests.contrib import kit_app
        return kit_app.app
''')


def test_the_readme_five_line_test(pytester, redis_url, monkeypatch):
    """The README's quick start test, run as a user would run it: the app in
    ``shop.py``, the plugin named in ``conftest.py``, the app in the ini."""
    monkeypatch.setenv('COMPENSATE_TEST_REDIS_URL', redis_url)
    monkeypatch.setenv('PYTHONPATH', ROOT)
    pytester.makepyfile(shop=textwrap.dedent('''
        from celery import Celery
        from celery_compensate import install

        app = Celery("shop", broker="redis://localhost:6379/0")
        install(app)
        @app.task
        def release_stock(reservation, order_id, qty): print("released", reservation)
        @app.task(compensate_with=release_stock)
        def reserve_stock(order_id, qty): return f"res-{order_id}"
        @app.task
        def refund(payment, reservation, order_id): print("refunded", payment)
        @app.task(compensate_with=refund)
        def charge_card(reservation, order_id): return f"pay-{order_id}"
        @app.task
        def ship(order_id): raise RuntimeError("no courier")
    '''))
    pytester.makeconftest(
        'pytest_plugins = ("celery_compensate.contrib.pytest",)\n')
    pytester.makeini('[pytest]\ncompensate_celery_app = shop:app\n')
    pytester.makepyfile(test_shop=_readme_test())
    result = pytester.runpytest_subprocess('-p', 'no:cacheprovider',
                                           '-p', 'no:celery')
    result.assert_outcomes(passed=2)


def _readme_test() -> str:
    """The tests the docs show: the README's quick start, and the first
    example of the Testing your sagas page (an rst code block)."""
    root = os.path.join(os.path.dirname(__file__), '..', '..')
    readme = open(os.path.join(root, 'README.md')).read()
    start = readme.index('# test_shop.py')
    blocks = [readme[start:readme.index('```', start)]]
    page = open(os.path.join(root, 'docs', 'testing.rst')).read()
    lines = page[page.index('   def test_a_declined_card_releases_the_stock'):
                 ].splitlines()
    body = [lines[0]]
    for line in lines[1:]:
        if line.strip() and not line.startswith('   '):
            break                       # the code block ended
        body.append(line)
    blocks.append(textwrap.dedent('\n'.join(body)))
    return '\n\n'.join(blocks)


def test_an_app_in_the_ini_that_cannot_be_imported_is_named(pytester):
    pytester.makeconftest(
        'pytest_plugins = ("celery_compensate.contrib.pytest",)\n')
    pytester.makeini('[pytest]\ncompensate_celery_app = nowhere.celery:app\n')
    pytester.makepyfile(test_x='def test_x(compensate_app): pass\n')
    result = pytester.runpytest_subprocess('-p', 'no:cacheprovider',
                                           '-p', 'no:celery')
    assert result.ret != 0
    result.stdout.fnmatch_lines([
        "*compensate_celery_app = nowhere.celery:app: No module named "
        "'nowhere'*importable*"])
