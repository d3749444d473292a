"""The saga store behind Redis Sentinel: a primary, a replica and one
Sentinel on loopback ports, started here, and a ``SENTINEL FAILOVER``
while a saga runs.  The broker stays the session's single Redis."""
from __future__ import annotations

import shutil
import time
import uuid
from typing import Any, Iterator

import pytest
import redis
from celery import Task, shared_task

from celery_compensate import SagaState, SagaStoreUnavailable, saga
from celery_compensate.clients import SENTINEL_CHECK_INTERVAL
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef, UndoSpec
from celery_compensate.settings import Settings
from celery_compensate.store import SagaStore, make_client
from celery_compensate.testing import RedisSentinelProcess, free_port
from celery_compensate.store import layout as L

from .. import tasks
from ..helpers import wait_for
from ..helpers import undone

MASTER = 'compensate-test'


@pytest.fixture(scope='module')
def sentinel() -> Iterator[RedisSentinelProcess]:
    if not shutil.which('redis-server'):
        pytest.skip('redis-server is not on PATH: the Sentinel tests start '
                    'a primary, a replica and a Sentinel of their own (CI '
                    'installs it)')
    with RedisSentinelProcess(MASTER) as started:
        yield started


def conf(sentinel: RedisSentinelProcess) -> dict[str, Any]:
    return {'compensate_redis_url': sentinel.url,
            'compensate_redis_transport_options': {'master_name': MASTER}}


@pytest.fixture(scope='module')
def celery_config(celery_config: dict, sentinel: RedisSentinelProcess) -> dict:
    return {**celery_config, **conf(sentinel)}


@pytest.fixture(scope='module')
def srds(sentinel: RedisSentinelProcess) -> Iterator[redis.Redis]:
    """The client the tasks write their ledger with: made as the store's,
    so it follows the failover too."""
    client = make_client(Settings.from_conf(conf(sentinel)))
    tasks._clients[sentinel.url] = client
    yield client
    tasks._clients.pop(sentinel.url, None)
    client.close()


@pytest.fixture
def env(celery_app, celery_worker, rds, srds) -> Any:
    return celery_app


def log(srds: redis.Redis, app, saga_id: str) -> list[str]:
    return srds.lrange(tasks.ledger_key(app, saga_id), 0, -1)


def gate_key(app, saga_id: str) -> str:
    return f'{get_state(app).settings.key_prefix}-t:gate:{saga_id}'


@shared_task(bind=True, name='ts.gated', compensate_with='t.undo')
def gated(self: Task, name: str) -> str:
    """A step that runs until the test opens its gate (a key in the
    broker's Redis, which no failover touches)."""
    tasks.note(self, f'start:{name}')
    deadline = time.monotonic() + 30
    gate = gate_key(self.app, self.request.compensate_saga_id)
    with redis.Redis.from_url(self.app.conf.broker_url) as broker:
        while not broker.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f'the gate of {name} never opened')
            time.sleep(0.02)
    tasks.note(self, f'do:{name}')
    return f'res-{name}'


def on_primary(port: int, store: SagaStore, saga_id: str, field: str) -> Any:
    """A field of the saga's record, read from the server on ``port``."""
    with redis.Redis(port=port, decode_responses=True) as server:
        return server.hget(store.keys.saga(saga_id), field)


def test_a_failover_while_a_saga_runs(env, srds, sentinel, rds, prefix):
    store = get_state(env).store
    old = sentinel.master_port()
    res = saga(tasks.do.si('a'), gated.si('b'), tasks.do.si('c')).apply_async()
    wait_for(lambda: 'start:b' in log(srds, env, res.id), timeout=15)
    # what the saga recorded so far (its start, step a) reached the replica
    with redis.Redis(port=old) as primary:
        pipe = primary.pipeline(transaction=False)
        pipe.incr(f'{prefix}-t:sync')
        pipe.execute_command('WAIT', 1, 5000)
        assert pipe.execute()[1] == 1
    new = sentinel.failover()
    assert new != old and sentinel.master_port() == new
    # the store's client (and the ledger's) move within the check interval,
    # while the former primary still takes writes (until it is demoted)
    for client in (store.client, srds):
        wait_for(lambda c=client: c.ping() and tuple(
            c.connection_pool.master_address) == ('127.0.0.1', new),
            timeout=SENTINEL_CHECK_INTERVAL + 5)
    rds.set(gate_key(env, res.id), 1)
    assert res.wait(timeout=20) is SagaState.COMPLETED
    assert on_primary(new, store, res.id, L.STATE) == 'COMPLETED'
    assert on_primary(new, store, res.id, L.step_state(1)) == 'D'
    entries = log(srds, env, res.id)
    assert ['do:a', 'do:b', 'do:c'] == [e for e in entries
                                        if e.startswith('do:')]
    assert undone(entries) == []

    # after the failover a saga with a failing step compensates
    bad = saga(tasks.do.si('a'), tasks.do.si('b'),
               tasks.do.si('c', fail=True)).apply_async()
    assert bad.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(log(srds, env, bad.id)) == ['b', 'a']
    assert on_primary(new, store, bad.id, L.STATE) == 'COMPENSATED'


def test_the_broker_sentinels_are_the_default_store(sentinel):
    """No compensate_redis_url and a sentinel:// broker: its Sentinels and
    broker_transport_options' master_name."""
    settings = Settings.from_conf({
        'broker_url': f'{sentinel.url};sentinel://127.0.0.1:{free_port()}/0',
        'broker_transport_options': {'master_name': MASTER,
                                     'visibility_timeout': 3600},
        'compensate_key_prefix': f'cctest-{uuid.uuid4().hex[:8]}'})
    assert settings.redis_transport_options['master_name'] == MASTER
    store = SagaStore(settings)
    plan = Plan.from_stages([[(TaskRef('t.do', ('x',)), UndoSpec('t.undo'),
                               False)]])
    assert store.create('from-broker', plan)
    assert store.get_state('from-broker') is SagaState.RUNNING
    assert on_primary(sentinel.master_port(), store, 'from-broker',
                      L.STATE) == 'RUNNING'
    store.client.delete(store.keys.saga('from-broker'))
    store.client.close()


def test_a_primary_without_its_replicas_is_unavailable_not_broken(sentinel):
    """NOREPLICAS (min-replicas-to-write, e.g. a former primary after a
    failover) is retried like a lost connection."""
    store = SagaStore(Settings.from_conf(conf(sentinel)))
    plan = Plan.from_stages([[(TaskRef('t.do', ('x',)), None, False)]])
    with redis.Redis(port=sentinel.master_port()) as primary:
        primary.config_set('min-replicas-to-write', 5)
        try:
            with pytest.raises(SagaStoreUnavailable, match='NOREPLICAS'):
                store.create(f'norep-{uuid.uuid4().hex[:6]}', plan)
        finally:
            primary.config_set('min-replicas-to-write', 0)
    store.client.close()


def test_unreachable_sentinels_are_unavailable_with_the_password_masked():
    url = (f'sentinel://:s3cret@127.0.0.1:{free_port()}/0;'
           f'sentinel://:s3cret@127.0.0.1:{free_port()}/0')
    settings = Settings.from_conf({
        'compensate_redis_url': url,
        'compensate_redis_transport_options': {
            'master_name': MASTER, 'sentinel_kwargs': {'password': 'hidden'}}})
    assert 's3cret' not in settings.safe_redis_url
    assert 'hidden' not in repr(settings) and 's3cret' not in repr(settings)
    store = SagaStore(settings)
    with pytest.raises(SagaStoreUnavailable) as info:
        store.get_state('some-saga')
    text = str(info.value)
    assert 'is unreachable' in text
    assert "No master found for 'compensate-test'" in text
    assert 's3cret' not in text and 'hidden' not in text
    assert text.count(':**@') == 2
