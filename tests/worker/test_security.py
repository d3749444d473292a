"""Security: credentials and TLS in ``compensate_redis_url``, secrets kept
out of logs and records, and records that cannot make a worker run
anything but the app's own undo tasks."""
from __future__ import annotations

import logging
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.utils.json import dumps, loads

from celery_compensate import (
    CorruptSagaRecord, SagaState, SagaStoreUnavailable, install, saga,
)
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskIdInfo, TaskRef, UndoSpec
from celery_compensate.recovery import check_persistence
from celery_compensate.settings import Settings
from celery_compensate.store import SagaStore
from celery_compensate.testing import delete_keys, free_port, wait_ping
from celery_compensate.store import layout as L

from .. import tasks
from ..helpers import wait_for

SECRET = 's3cret-' + uuid.uuid4().hex[:8]


@contextmanager
def app_with_store(broker_url: str, store_url: str,
                   rds: redis.Redis) -> Iterator[Celery]:
    """An app whose saga store is ``store_url``, with a threads worker."""
    prefix = f'cctest-sec-{uuid.uuid4().hex[:8]}'
    app = Celery('sec', broker=broker_url, set_as_current=False)
    app.conf.update(compensate_redis_url=store_url,
                    compensate_key_prefix=prefix,
                    task_default_queue=f'{prefix}-q',
                    worker_hijack_root_logger=False)
    install(app)
    app.set_current()
    try:
        with start_worker(app, pool='threads', concurrency=2,
                          perform_ping_check=False, shutdown_timeout=20):
            yield app
    finally:
        store = get_state(app).store
        delete_keys(store.client, f'{prefix}*')
        delete_keys(rds, f'{prefix}*')
        store.client.close()
        app.close()


def run_two_sagas(app: Celery) -> tuple[str, str]:
    ok = saga(tasks.do.si('a'), tasks.do.si('b'), app=app).apply_async()
    bad = saga(tasks.do.si('a'), tasks.do.si('b', fail=True),
               app=app).apply_async()
    assert ok.wait(timeout=15) is SagaState.COMPLETED
    assert bad.wait(timeout=15) is SagaState.COMPENSATED
    return ok.id, bad.id


def test_an_acl_user_with_a_password(redis_url, rds, caplog):
    user = f'cctest-{uuid.uuid4().hex[:6]}'
    rds.acl_setuser(user, enabled=True, passwords=[f'+{SECRET}'],
                    keys=['*'], channels=['*'], commands=['+@all'])
    host = redis_url.split('://', 1)[1]
    url = f'redis://{user}:{SECRET}@{host}'
    try:
        with caplog.at_level(logging.DEBUG), \
                app_with_store(redis_url, url, rds) as app:
            store = get_state(app).store
            ok, bad = run_two_sagas(app)
            assert store.client.acl_whoami() == user
            for sid in (ok, bad):
                assert SECRET not in repr(store.client.hgetall(store.keys.saga(sid)))
            assert SECRET not in repr(store.settings)
        # a wrong password: the error names the store, never the secret
        wrong = Settings.from_conf({'compensate_redis_url':
                                    f'redis://{user}:{SECRET}x@{host}'})
        with pytest.raises(Exception) as info:
            SagaStore(wrong).get_state('x')
        assert SECRET not in str(info.value)
        assert user in str(info.value) or 'auth' in str(info.value).lower()
    finally:
        rds.acl_deluser(user)
    assert SECRET not in caplog.text


def test_an_unreachable_store_with_a_password_is_named_without_it():
    settings = Settings.from_conf({
        'compensate_redis_url': f'redis://:{SECRET}@127.0.0.1:{free_port()}/0',
        'compensate_redis_socket_timeout': 0.5})
    with pytest.raises(SagaStoreUnavailable) as info:
        SagaStore(settings).get_state('x')
    assert SECRET not in str(info.value) and '**' in str(info.value)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server speaking only TLS, with a throwaway CA-less cert."""
    binary, openssl = shutil.which('redis-server'), shutil.which('openssl')
    if not binary or not openssl:
        pytest.skip('TLS test needs redis-server and openssl on PATH')
    cert, key = tmp_path / 'cert.pem', tmp_path / 'key.pem'
    subprocess.run(
        [openssl, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days',
         '1', '-keyout', str(key), '-out', str(cert), '-subj',
         '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'],
        check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [binary, '--port', '0', '--tls-port', str(port), '--bind',
         '127.0.0.1', '--tls-cert-file', str(cert), '--tls-key-file',
         str(key), '--tls-ca-cert-file', str(cert), '--tls-auth-clients', 'no',
         '--save', '', '--dir', str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = (f'rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required'
           f'&ssl_ca_certs={cert}')
    try:
        wait_ping(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_tls_store(redis_url, rds, tls_redis):
    with app_with_store(redis_url, tls_redis, rds) as app:
        run_two_sagas(app)
        assert get_state(app).store.client.connection_pool.connection_kwargs[
            'ssl_cert_reqs'] == 'required'


def _forge(store: SagaStore, rds: redis.Redis, sid: str, undo: str) -> None:
    spec = loads(rds.hget(store.keys.saga(sid), L.spec(0)))
    spec['undo']['task'] = undo
    rds.hset(store.keys.saga(sid), L.spec(0), dumps(spec))


@pytest.mark.parametrize('undo', ['celery.backend_cleanup', 'evil.not_a_task'])
def test_a_forged_record_cannot_run_other_tasks(celery_app, rds, undo, caplog):
    """Undos are read back from Redis: one that is not a task of the app,
    or one of Celery's own, is never sent; the saga waits for an operator."""
    state = get_state(celery_app)
    plan = Plan.from_stages([[(TaskRef('t.do', ('a',)), UndoSpec('t.undo'),
                               False)], [(TaskRef('t.do', ('b',)), None, False)]])
    state.store.create('forged', plan)
    state.store.step_done('forged', 0, '"res-a"')
    _forge(state.store, rds, 'forged', undo)
    with caplog.at_level(logging.ERROR):
        state.coordinator.step_failed(TaskIdInfo('forged', 1, False), 'boom')
    assert state.store.get_state('forged') is SagaState.COMPENSATION_FAILED
    assert f"the undo of step 0 (t.do) names '{undo}', which a saga may " \
        'not run' in caplog.text
    assert rds.llen(celery_app.conf.task_default_queue) == 0  # nothing sent
    assert state.store.read('forged').steps[0].undo_attempts == \
        state.settings.undo_max_attempts


def test_nothing_read_back_is_unpickled(celery_app, rds):
    """Records are JSON: a pickle planted in one is a corrupt record."""
    import pickle
    store = get_state(celery_app).store
    plan = Plan.from_stages([[(TaskRef('t.do', ('a',)), UndoSpec('t.undo'),
                               False)]])
    store.create('pickled', plan)
    rds.hset(store.keys.saga('pickled'), L.spec(0), pickle.dumps({'task': 'x'}))
    with pytest.raises(CorruptSagaRecord, match='pickled'):
        store.read('pickled')


def test_a_store_that_evicts_or_has_no_aof_is_warned_about(redis_url, rds):
    client = redis.Redis.from_url(redis_url)
    before = rds.config_get('maxmemory*')
    aof = rds.config_get('appendonly')['appendonly']
    try:
        rds.config_set('appendonly', 'no')
        rds.config_set('maxmemory', 1 << 30)
        rds.config_set('maxmemory-policy', 'allkeys-lru')
        problems = check_persistence(client, 'redis://store')
        assert any('evicts keys (maxmemory-policy allkeys-lru)' in p
                   for p in problems)
        assert any('no append-only file' in p for p in problems)
        rds.config_set('maxmemory-policy', 'noeviction')
        rds.config_set('appendonly', 'yes')
        wait_for(lambda: not check_persistence(client, 'redis://store'))
    finally:
        rds.config_set('maxmemory', before['maxmemory'])
        rds.config_set('maxmemory-policy', before['maxmemory-policy'])
        rds.config_set('appendonly', aof)
        client.close()


def test_a_forged_forward_step_cannot_run_celery_tasks_or_callbacks(
        celery_app, rds):
    """A forward step read back from Redis may not name one of Celery's own
    tasks, and callbacks in a record's options are dropped."""
    from celery_compensate.coordinator import _allowed
    state = get_state(celery_app)
    plan = Plan.from_stages([[(TaskRef('t.do', ('a',)), UndoSpec('t.undo'),
                               False)], [(TaskRef('t.do', ('b',)), None, False)]])
    state.store.create('forged-fwd', plan)
    spec = loads(rds.hget(state.store.keys.saga('forged-fwd'), L.spec(1)))
    spec['call']['task'] = 'celery.backend_cleanup'
    rds.hset(state.store.keys.saga('forged-fwd'), L.spec(1), dumps(spec))
    state.coordinator.step_done(TaskIdInfo('forged-fwd', 0, False), 'ra')
    record = state.store.read('forged-fwd')
    assert record.state is SagaState.COMPENSATING      # a's undo is queued
    assert 'may not run' in record.steps[1].failure
    queued = rds.lrange(celery_app.conf.task_default_queue, 0, -1)
    assert len(queued) == 1 and 'celery.backend_cleanup' not in queued[0]
    assert _allowed({'link': {'task': 'x'}, 'link_error': 1, 'queue': 'q',
                     'task_id': 'y'}) == {'queue': 'q'}
