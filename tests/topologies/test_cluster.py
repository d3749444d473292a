"""The saga store on a real Redis Cluster: three primaries on loopback
ports, started here.  The broker stays the session's single Redis (kombu
has no cluster transport); the threads worker and the tasks' ledger use
the cluster."""
from __future__ import annotations

import shutil
import uuid
from collections import Counter
from typing import Any, Iterator

import pytest
import redis
from celery import group

from celery_compensate import SagaResult, SagaState, SagaStoreUnavailable, saga
from celery_compensate.clients import LazyRedisCluster
from celery_compensate.appstate import get_state
from celery_compensate.model import Plan, TaskRef, UndoSpec
from celery_compensate.recovery import check_persistence
from celery_compensate.settings import Settings
from celery_compensate.store import SagaStore, make_client, shard_of
from celery_compensate.testing import RedisClusterProcess, free_port
from celery_compensate.store import layout as L

from .. import tasks
from ..helpers import wait_for
from ..helpers import assert_stage_order, undone
from ..helpers import FAST


@pytest.fixture(scope='module')
def cluster() -> Iterator[RedisClusterProcess]:
    if not shutil.which('redis-server'):
        pytest.skip('redis-server is not on PATH: the Redis Cluster tests '
                    'start a 3-primary cluster of their own (CI installs it)')
    with RedisClusterProcess(masters=3) as started:
        yield started


@pytest.fixture(scope='module')
def celery_config(celery_config: dict, cluster: RedisClusterProcess) -> dict:
    return {**celery_config, 'compensate_redis_url': cluster.url}


@pytest.fixture(scope='module')
def crds(cluster: RedisClusterProcess) -> Iterator[LazyRedisCluster]:
    """The cluster client the tasks write their ledger with (tests.tasks
    makes plain clients; this one is made as the store's)."""
    client = make_client(Settings.from_conf(
        {'compensate_redis_url': cluster.url}))
    tasks._clients[cluster.url] = client
    yield client
    tasks._clients.pop(cluster.url, None)
    client.close()


@pytest.fixture
def env(celery_app, celery_worker, rds, crds) -> Any:
    """The installed app (its store on the cluster) and a running worker."""
    return celery_app


def log(crds: LazyRedisCluster, app, saga_id: str) -> list[str]:
    return crds.lrange(tasks.ledger_key(app, saga_id), 0, -1)


def node_of(cluster: RedisClusterProcess, key: str) -> int:
    """The port of the primary that holds ``key`` (found by asking each
    node directly, not through the cluster client)."""
    ports = []
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as client:
            try:
                if client.exists(key):
                    ports.append(node.port)
            except redis.exceptions.MovedError:
                pass            # its slot is another node's
    assert len(ports) == 1, (key, ports)
    return ports[0]


def test_a_saga_completes_with_one_round_trip_per_step(env, crds):
    store = get_state(env).store
    saga(tasks.do.si('warm')).apply_async().wait(timeout=10)  # loads scripts
    calls: list[Any] = []
    cluster = store.client.cluster
    original = cluster.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return original(*args, **kwargs)

    cluster.execute_command = counting
    try:
        res = saga(*[tasks.do.si(f's{i}') for i in range(4)]).apply_async()
        wait_for(lambda: crds.hget(store.keys.saga(res.id), L.STATE) == 'COMPLETED')
    finally:
        del cluster.execute_command
    assert calls == ['EVALSHA'] * 5, calls      # start + one per step
    assert res.wait(timeout=5) is SagaState.COMPLETED
    entries = log(crds, env, res.id)
    assert [e for e in entries if e.startswith('do:')] == [
        f'do:s{i}' for i in range(4)] and undone(entries) == []


def test_a_parallel_stage_that_fails_compensates_in_reverse(env, crds):
    res = saga(tasks.do.si('a'),
               group(tasks.do.si('b1'), tasks.do.si('b2', fail=True),
                     tasks.do.si('b3')),
               tasks.do.si('c')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    entries = log(crds, env, res.id)
    assert sorted(undone(entries)) == ['a', 'b1', 'b3']
    assert undone(entries)[-1] == 'a' and 'start:c' not in entries
    assert_stage_order(entries, {'b1', 'b3'}, {'a'})


def test_a_failed_compensation_is_retried_after_the_fix(env, crds):
    sid = f'cf-{uuid.uuid4().hex[:8]}'
    crds.set(tasks.countdown_key(env, sid, 'a'), 100)  # a's undo keeps failing
    res = saga(tasks.do.si('a'), tasks.do.si('b'),
               tasks.do.si('c', fail=True)).apply_async(saga_id=sid)
    assert res.wait(timeout=20) is SagaState.COMPENSATION_FAILED
    assert res.steps[0].undo_state.name == 'FAILED'
    crds.set(tasks.countdown_key(env, sid, 'a'), 0)    # fixed
    assert res.retry() is True
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(log(crds, env, sid)) == ['b', 'a']
    assert res.info().retries == 1


@pytest.mark.compensate_conf(**FAST)
def test_the_sweep_recovers_a_step_nobody_consumes(env, crds, prefix):
    """The sweep (its lock, its 64 pipelined scans, RECOVER) on a cluster."""
    res = saga(tasks.do.si('a'), tasks.do.si('b').set(queue=f'{prefix}-nobody'),
               tasks.do.si('c')).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(log(crds, env, res.id)) == ['a']
    assert res.steps[1].failure.startswith('lost: no worker took it')


def test_sagas_spread_over_the_nodes_and_each_keeps_to_one_slot(
        env, crds, cluster):
    store = get_state(env).store
    # saga ids whose shards live on every node
    by_node: dict[int, str] = {}
    while len(by_node) < len(cluster.nodes):
        sid = f'spread-{uuid.uuid4().hex[:8]}'
        port = store.client.cluster.get_node_from_key(store.keys.saga(sid)).port
        by_node.setdefault(port, sid)
    results = [saga(tasks.do.si('a'), tasks.do.si('b')).apply_async(saga_id=sid)
               for sid in by_node.values()]
    assert all(r.wait(timeout=15) is SagaState.COMPLETED for r in results)
    for port, sid in by_node.items():
        shard = shard_of(sid)
        keys = [store.keys.saga(sid), store.keys.live(shard), store.keys.sagas(shard),
                store.keys.ends(shard)]
        assert len({crds.cluster_keyslot(k) for k in keys}) == 1, keys
        assert node_of(cluster, store.keys.saga(sid)) == port
        assert node_of(cluster, store.keys.sagas(shard)) == port
    # list_sagas reads the shards' indexes on every node, newest first
    listed = [entry.saga_id for entry in store.list_sagas(limit=1000)
              if entry.saga_id in by_node.values()]
    assert listed == [r.id for r in reversed(results)]
    done = store.list_sagas(state=SagaState.COMPLETED, limit=1000)
    assert set(by_node.values()) <= {entry.saga_id for entry in done}


def test_scripts_reload_on_every_node_after_a_script_flush(env, crds, cluster):
    """As after a node restart or failover: NOSCRIPT in a single call and
    in the pipelines (renew, the sweep's scans) loads the scripts again."""
    store = get_state(env).store
    plan = Plan.from_stages([[(TaskRef('t.do', ('x',)), UndoSpec('t.undo'),
                               False)]])
    sids = [f'flush-{n}-{uuid.uuid4().hex[:6]}' for n in range(12)]
    for sid in sids:
        assert store.create(sid, plan)
    nodes = Counter(node_of(cluster, store.keys.saga(sid)) for sid in sids)
    assert len(nodes) > 1, nodes

    def flush() -> None:
        for node in cluster.nodes:
            with redis.Redis(port=node.port) as client:
                client.script_flush()

    flush()
    assert store.renew([(sid, 0, None) for sid in sids]) == len(sids)
    flush()
    _, due, _ = store.due(100, 60.0, 1.0)
    assert not set(due) & set(sids)
    flush()
    assert store.step_done(sids[0], 0, '"rx"').status == 'completed'
    # a saga through the worker after a flush
    flush()
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    assert undone(log(crds, env, res.id)) == ['a']


def test_quarantine_and_persistence_checks_on_a_cluster(env, crds, cluster):
    store = get_state(env).store
    plan = Plan.from_stages([[(TaskRef('t.do', ('x',)), None, False)]])
    sid = f'bad-{uuid.uuid4().hex[:8]}'
    store.create(sid, plan)
    store.quarantine(sid)          # a MULTI on the one slot of the shard
    shard = shard_of(sid)
    assert crds.zscore(store.keys.bad(shard), sid)
    assert crds.zscore(store.keys.due(shard), sid) is None
    problems = check_persistence(store.client, store.settings.safe_redis_url)
    # every primary is checked, each named
    assert len(problems) == len(cluster.nodes)
    for node in cluster.nodes:
        assert any(f'node 127.0.0.1:{node.port}) has no append-only file' in p
                   for p in problems), problems


def test_an_unreachable_cluster_is_unavailable_with_the_password_masked():
    url = (f'redis+cluster://user:s3cret@127.0.0.1:{free_port()},'
           f'127.0.0.1:{free_port()}')
    store = SagaStore(Settings.from_conf({'compensate_redis_url': url}))
    with pytest.raises(SagaStoreUnavailable) as info:
        store.get_state('some-saga')
    assert 'is unreachable' in str(info.value) and 's3cret' not in str(
        info.value) and 'user:**@' in str(info.value)
    # the worker's lock is made without a connection, and fails the same way
    lock = store.client.lock(store.keys.lock(), timeout=3, blocking=False,
                             thread_local=False)
    with pytest.raises(redis.ConnectionError):
        lock.acquire(blocking=False)


def test_saga_result_reads_a_record_through_the_cluster(env, crds):
    res = saga(tasks.do.si('a'), tasks.do.si('b', fail=True)).apply_async()
    assert res.wait(timeout=15) is SagaState.COMPENSATED
    again = SagaResult(res.id, app=env)
    assert [s.state.name for s in again.steps] == ['DONE', 'FAILED']
    assert again.abort() is False


@pytest.mark.parametrize('error', [
    redis.exceptions.ClusterDownError('CLUSTERDOWN The cluster is down'),
    redis.exceptions.MasterDownError('MASTERDOWN Link with MASTER is down'),
    redis.exceptions.TryAgainError('TRYAGAIN Multiple keys request'),
    redis.exceptions.ClusterError('TTL exhausted.'),
    redis.exceptions.SlotNotCoveredError('slot 7 is not covered'),
], ids=lambda e: type(e).__name__)
def test_cluster_errors_after_which_a_call_may_succeed_are_unavailable(error):
    store = SagaStore(Settings.from_conf({
        'compensate_redis_url': f'redis+cluster://127.0.0.1:{free_port()}'}))

    def fails() -> None:
        raise error

    with pytest.raises(SagaStoreUnavailable, match='is unreachable'):
        store._run(fails)


def test_a_nested_saga_keeps_its_tree_in_one_slot(env, crds):
    """A child is in its root's slot: its start takes its parent's step,
    its undo as a unit, and the root's expiry of the whole tree each run
    as one command on one node."""
    res = saga(tasks.do.si('a'), saga(tasks.do.si('b'), tasks.do.si('c')),
               tasks.do.si('d', fail=True)).apply_async()
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    assert undone(log(crds, env, res.id)) == ["c", "b", "a"]
    store = get_state(env).store
    child = res.children[0]
    assert child.state is SagaState.COMPENSATED
    assert crds.ttl(store.keys.saga(child.id)) > 0
