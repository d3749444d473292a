"""Bad input gets a clear error naming the culprit, before anything is
stored or published."""
from __future__ import annotations

import pytest
from celery import Celery, chain, group

from celery_compensate import (
    ImproperlyConfigured, InvalidSaga, SagaNotFound, SagaResult, SagaState,
    SagaStoreUnavailable, SagaTimeoutError, install, saga,
)
from celery_compensate.appstate import get_state

from .. import tasks
from celery_compensate.testing import free_port


def test_no_steps(celery_app):
    with pytest.raises(InvalidSaga, match='at least one step'):
        saga(app=celery_app)
    with pytest.raises(InvalidSaga, match='at least one task'):
        saga(group([]), app=celery_app)
    with pytest.raises(InvalidSaga, match='at least one step'):
        saga(chain(), app=celery_app)


def test_unregistered_undo_names_undo_and_step(celery_app):
    with pytest.raises(InvalidSaga, match=r"step 0 \(t.plain\): undo task 'no.such.undo'"):
        saga(tasks.plain.si('a').set(compensate_with='no.such.undo'))


def test_an_undo_that_cannot_take_its_call_fails_at_saga(celery_app):
    """Celery's own argument check, applied when the saga is built: the
    error names the step, the undo and the call it would get."""
    with pytest.raises(InvalidSaga, match=(
            r"step 0 \(t.do_narrow\): its undo 't.narrow_undo' cannot take "
            r"the call it gets, t.narrow_undo\(<result>, 'a'\), which is "
            r"\(result, \*args, \*\*kwargs\)")):
        saga(tasks.do_narrow.si('a')).apply_async()
    # an undo with its own arguments only (.si) is checked with them
    with pytest.raises(InvalidSaga, match=r"t.narrow_undo\(1, 2\)"):
        saga(tasks.do_narrow.si('a').set(
            compensate_with=tasks.narrow_undo.si(1, 2))).apply_async()
    saga(tasks.do_narrow.si('a').set(
        compensate_with=tasks.narrow_undo.si(None)))   # fits
    # a first step given its arguments at apply_async is checked then,
    # before anything is stored or published
    partial = saga(tasks.do_narrow.s())
    with pytest.raises(InvalidSaga, match=r"t.narrow_undo\(<result>, 'a'\)"):
        partial.apply_async(('a',), saga_id='narrow-partial')
    with pytest.raises(SagaNotFound):
        SagaResult('narrow-partial', app=celery_app).state


def test_compensate_with_of_the_wrong_type(celery_app):
    with pytest.raises(InvalidSaga, match=r"step 0 \(t.plain\).*got int 42"):
        saga(tasks.plain.si('a').set(compensate_with=42))
    with pytest.raises(InvalidSaga, match='single task signature'):
        saga(tasks.plain.si('a').set(
            compensate_with=chain(tasks.undo.s('x'), tasks.undo.s('y'))))


def test_compensate_on_failure_needs_an_undo(celery_app):
    with pytest.raises(InvalidSaga, match='compensate_on_failure=True needs'):
        saga(tasks.plain.si('a').set(compensate_on_failure=True))


def test_not_a_signature(celery_app):
    with pytest.raises(InvalidSaga, match="got str 'oops'"):
        saga(tasks.plain.si('a'), 'oops')


def test_callbacks_and_chains_inside_groups_are_refused(celery_app):
    with pytest.raises(InvalidSaga, match='link_error'):
        saga(tasks.plain.si('a').set(link_error=tasks.plain.si('e')))
    with pytest.raises(InvalidSaga, match='chains inside parallel stages'):
        saga(group(chain(tasks.plain.si('a'), tasks.plain.si('b')),
                   tasks.plain.si('c')))


def test_unserializable_arguments_fail_at_start(celery_app, rds):
    with pytest.raises(InvalidSaga, match=r'step 1 \(t.do\).*cannot be serialized'):
        saga(tasks.do.si('a'), tasks.do.si(object()))
    with pytest.raises(InvalidSaga, match='cannot be serialized'):
        saga(tasks.do.s()).apply_async((object(),))
    assert rds.llen(celery_app.conf.task_default_queue) == 0


def test_redis_unreachable_at_start_publishes_nothing(redis_url, rds, prefix):
    app = Celery('down', broker=redis_url, set_as_current=False)
    app.conf.update(
        compensate_redis_url=f'redis://:s3cret@127.0.0.1:{free_port()}/0',
        compensate_redis_socket_timeout=0.5, task_default_queue=f'{prefix}-q')
    install(app)
    s = saga(app.signature('t.plain', ('a',)), app=app)
    with pytest.raises(SagaStoreUnavailable, match='unreachable') as exc:
        s.apply_async()
    assert 's3cret' not in str(exc.value)
    assert rds.llen(f'{prefix}-q') == 0


def test_options_the_saga_sets_itself_are_refused(celery_app, rds):
    s = saga(tasks.plain.si('a'))
    for option in ('task_id', 'link_error', 'chain'):
        with pytest.raises(InvalidSaga, match=option):
            s.apply_async(**{option: 'x'})
    assert rds.llen(celery_app.conf.task_default_queue) == 0


def test_duplicate_and_invalid_saga_ids(celery_app, rds):
    s = saga(tasks.plain.si('a'))
    s.apply_async(saga_id=f'{celery_app.conf.compensate_key_prefix}-dup')
    with pytest.raises(InvalidSaga, match='already exists'):
        s.apply_async(saga_id=f'{celery_app.conf.compensate_key_prefix}-dup')
    with pytest.raises(ValueError, match='invalid saga id'):
        s.apply_async(saga_id='has.dot{brace}')


def test_unknown_saga_id_names_it(celery_app):
    res = SagaResult('no-such-saga', app=celery_app)
    with pytest.raises(SagaNotFound, match="'no-such-saga'"):
        _ = res.state
    with pytest.raises(SagaNotFound):
        _ = res.steps


def test_wait_times_out_with_a_timeout_error(celery_app, rds):
    res = saga(tasks.plain.si('a')).apply_async()   # no worker is running
    assert res.state is SagaState.RUNNING
    with pytest.raises(TimeoutError, match='still RUNNING'):
        res.wait(timeout=0.2)
    with pytest.raises(SagaTimeoutError):
        res.wait(timeout=0)


def test_install_is_idempotent_and_required():
    app = Celery('x', broker='redis://localhost:6379/0', set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match='install'):
        get_state(app)
    assert install(app) is install(app)
    assert get_state(app).settings.redis_url == 'redis://localhost:6379/0'


@pytest.mark.parametrize('option, value', [
    ('countdown', 'soon'), ('headers', 'x'), ('expires', 'later'),
    ('priority', 300), ('time_limit', '1'), ('serializer', 'no-such'),
])
def test_bad_publishing_options_fail_at_saga_not_at_publish(
        celery_app, option, value):
    with pytest.raises(InvalidSaga, match=r"step 1 \(t.plain\)"):
        saga(tasks.plain.si('a'), tasks.plain.si('b').set(**{option: value}))
    with pytest.raises(InvalidSaga, match=r"the undo of step 0 \(t.plain\)"):
        saga(tasks.plain.si('a').set(
            compensate_with=tasks.release.si().set(**{option: value})))


@pytest.mark.parametrize('value', [0.01, 'ten', True])
def test_a_bad_compensate_timeout_fails_at_saga(celery_app, value):
    with pytest.raises(InvalidSaga, match=r'step 0 \(t.do\): compensate_'
                                          r'timeout must be a number'):
        saga(tasks.do.si('a').set(compensate_timeout=value))

