"""What Flower 2.x shows of a saga: a real Flower process watching a
prefork worker run with ``-E``, checked through Flower's REST API and its
Prometheus ``/metrics``."""
from __future__ import annotations

import ast
import itertools
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from urllib.parse import quote

import pytest
import redis
from celery import Celery
from celery import signals as celery_signals

from celery_compensate import (
    SagaResult, SagaState, install, monitoring, saga, signals,
)
from celery_compensate.messages import (
    KWARGSREPR_MAXSIZE, is_labelled, label_kwargs,
)
from celery_compensate.monitoring import (
    COMPENSATION_FAILED_EVENT, SEND_TIMEOUT, send_compensation_failed,
)
from celery_compensate.testing import (
    FlowerProcess, WorkerProcess, delete_keys, free_port,
)

from .. import tasks
from ..helpers import wait_for

pytestmark = pytest.mark.prefork
ROOT = Path(__file__).resolve().parents[2]


class Env(NamedTuple):
    app: Celery
    rds: redis.Redis
    flower: FlowerProcess
    worker: WorkerProcess


@pytest.fixture(scope='module')
def env(redis_url: str) -> Iterator[Env]:
    """Flower, then one prefork worker sending task events, then a check
    that Flower receives them (it only sees live events)."""
    prefix = f'cctest-fl-{uuid.uuid4().hex[:8]}'
    queue = f'{prefix}-q'
    app = Celery('flower-producer', broker=redis_url, set_as_current=False)
    app.conf.update(compensate_key_prefix=prefix, task_default_queue=queue)
    install(app)
    rds = redis.Redis.from_url(redis_url, decode_responses=True)
    flower = FlowerProcess(redis_url)
    worker = WorkerProcess('tests.prefork_app', {
        'COMPENSATE_TEST_BROKER': redis_url,
        'COMPENSATE_TEST_PREFIX': prefix,
        'COMPENSATE_TEST_QUEUE': queue,
    }, '-P', 'prefork', '-c', '2', '-Q', queue, '-E', name='flower',
        cwd=ROOT)
    try:
        flower.start()
        worker.start()
        warm_up(app, flower, f'{prefix}-warmup')
        yield Env(app, rds, flower, worker)
    finally:
        worker.stop()
        flower.stop()
        delete_keys(rds, f'{prefix}*')
        rds.close()
        app.close()


def warm_up(app: Celery, flower: FlowerProcess, tag: str) -> None:
    """Send plain tasks until Flower lists one: its event consumer is
    subscribed from then on (events sent before are lost to it)."""
    counter = itertools.count()
    sent_at = 0.0

    def seen() -> dict[str, Any]:
        nonlocal sent_at
        if time.monotonic() - sent_at > 0.3:
            app.send_task('t.plain', args=(tag,),
                          task_id=f'{tag}-{next(counter)}')
            sent_at = time.monotonic()
        return search(flower, tag)

    wait_for(seen, timeout=20, interval=0.05)


def search(flower: FlowerProcess, query: str) -> dict[str, Any]:
    return json.loads(flower.get(f'/api/tasks?search={quote(query)}'))


def listed(flower: FlowerProcess, query: str) -> dict[str, tuple[str, str]]:
    """``{task id: (name, state)}`` of what Flower's search lists."""
    return {tid: (t['name'], t['state'])
            for tid, t in search(flower, query).items()}


def wait_listed(flower: FlowerProcess, query: str,
                expected: dict[str, tuple[str, str]]) -> None:
    """Wait until Flower's search lists ``expected`` (events arrive
    asynchronously); at the deadline, fail showing the difference."""
    last: dict[str, tuple[str, str]] = {}

    def check() -> bool:
        nonlocal last
        last = listed(flower, query)
        return last == expected

    try:
        wait_for(check, timeout=10)
    except AssertionError:
        assert last == expected


def compensation_failed_events(
        flower: FlowerProcess) -> dict[tuple[str, str], float]:
    """``{(worker, task): count}`` of Flower's ``flower_events_total``
    samples for our event type."""
    found = {}
    for line in flower.get('/metrics').decode().splitlines():
        if not line.startswith('flower_events_total{'):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line))
        if labels.get('type') == COMPENSATION_FAILED_EVENT:
            found[labels['worker'], labels['task']] = float(line.split()[-1])
    return found


def test_a_saga_is_found_in_flower_by_its_id(env: Env) -> None:
    """Every forward step (the failing one too) and every undo, under its
    own task name, each showing the saga id in its kwargs."""
    secret = 'card-4111'
    res = saga(
        tasks.do.si(name='a', amount=10),
        tasks.do.si(name='b', card=secret).set(kwargsrepr="{'card': '***'}"),
        tasks.do.si(name='c', fail=True),
        app=env.app).apply_async()
    sid = res.id
    assert res.wait(timeout=20) is SagaState.COMPENSATED
    expected = {
        f'{sid}.s0': ('t.do', 'SUCCESS'), f'{sid}.s1': ('t.do', 'SUCCESS'),
        f'{sid}.s2': ('t.do', 'FAILURE'),
        f'{sid}.u1.1': ('t.undo', 'SUCCESS'),
        f'{sid}.u0.1': ('t.undo', 'SUCCESS'),
    }
    wait_listed(env.flower, sid, expected)

    found = search(env.flower, sid)
    for tid, task in found.items():
        kwargs = ast.literal_eval(task['kwargs'])
        step = int(re.search(r'\.[su](\d+)', tid).group(1))
        identity = {'compensate_saga_id': sid, 'compensate_step': step}
        if '.u' in tid:
            identity['compensate_attempt'] = 1
        # the saga keys come first, then the task's own kwargs
        assert list(kwargs.items())[:len(identity)] == list(identity.items())
        if step != 1:  # step 1 and its undo hide their kwargs
            assert kwargs['name'] == 'abc'[step]
    assert ast.literal_eval(found[f'{sid}.s0']['kwargs'])['amount'] == 10
    # a kwargsrepr the caller set (to hide a secret) is kept, and the
    # undo, called with the same kwargs, hides them too
    for tid in (f'{sid}.s1', f'{sid}.u1.1'):
        assert ast.literal_eval(found[tid]['kwargs'])['card'] == '***'
        assert secret not in found[tid]['kwargs']
    # Flower's exact kwargs search finds the same tasks
    assert listed(env.flower, f'kwargs:compensate_saga_id={sid}') == expected
    assert set(listed(env.flower, f'kwargs:compensate_saga_id={sid} '
                                  'kwargs:compensate_step=1')) == {
        f'{sid}.s1', f'{sid}.u1.1'}


def test_a_failed_compensation_is_counted_in_flower_metrics(env: Env) -> None:
    """The undo fails every attempt: Flower shows each attempt under the
    undo's name, and counts one task-compensation_failed event for it."""
    app, rds, flower, _ = env
    sid = f'fl-{uuid.uuid4().hex}'
    max_attempts = 6  # tests/prefork_app.py: the default, 0.05 s backoff
    rds.set(tasks.countdown_key(app, sid, 'x'), 100)  # undo of x always fails
    before = compensation_failed_events(flower)
    res = saga(tasks.do.si(name='x'), tasks.do.si(name='y', fail=True),
               app=app).apply_async(saga_id=sid)
    assert res.wait(timeout=20) is SagaState.COMPENSATION_FAILED
    assert SagaResult(sid, app=app).steps[0].undo_attempts == max_attempts

    attempts = {f'{sid}.u0.{n}': ('t.undo', 'FAILURE')
                for n in range(1, max_attempts + 1)}
    wait_listed(flower, f'{sid}.u0.', attempts)

    def counted() -> dict[tuple[str, str], float]:
        now = compensation_failed_events(flower)
        return {key: n - before.get(key, 0) for key, n in now.items()
                if n > before.get(key, 0)}

    worker = search(flower, f'{sid}.u0.{max_attempts}')[
        f'{sid}.u0.{max_attempts}']['worker']
    # sent by the worker that ran the last attempt, under its node name
    assert wait_for(counted, timeout=10) == {(worker, 't.undo'): 1.0}


# -- the kwargsrepr itself ---------------------------------------------------

STEP = {'compensate_saga_id': 'abc', 'compensate_step': 2}


def test_kwargsrepr_of_an_undo_names_its_attempt() -> None:
    assert label_kwargs({**STEP, 'compensate_attempt': 3}, {'amount': 40}) == (
        "{'compensate_saga_id': 'abc', 'compensate_step': 2, "
        "'compensate_attempt': 3, 'amount': 40}")
    assert label_kwargs(STEP, {}) == (
        "{'compensate_saga_id': 'abc', 'compensate_step': 2}")


def test_kwargsrepr_keeps_the_saga_keys_when_cut() -> None:
    new = label_kwargs(STEP, {'blob': 'x' * 5000})
    assert new.startswith(
        "{'compensate_saga_id': 'abc', 'compensate_step': 2, 'blob': 'xxx")
    assert len(new) < KWARGSREPR_MAXSIZE + 10
    assert is_labelled(new)


def test_kwargsrepr_set_by_the_caller_hides_the_kwargs() -> None:
    real = {'card': '4111'}
    assert label_kwargs(STEP, real, "{'card': '***'}") == (
        "{'compensate_saga_id': 'abc', 'compensate_step': 2, 'card': '***'}")
    assert label_kwargs(STEP, real, '{}') == (
        "{'compensate_saga_id': 'abc', 'compensate_step': 2}")
    assert label_kwargs(STEP, real, '<hidden>') == (
        "{'compensate_saga_id': 'abc', 'compensate_step': 2, "
        "'kwargsrepr': '<hidden>'}")


def test_only_unlabelled_saga_messages_are_labelled_on_publish(
        celery_app: Celery) -> None:
    """The hook labels what Celery publishes again (a retry), and leaves
    alone what the coordinator labelled and what is not a saga's."""
    done = "{'compensate_saga_id': 'abc', 'compensate_step': 2, 'a': 1}"
    for headers, expected in (
            ({**STEP, 'kwargsrepr': "{'a': 1}"}, done),
            ({**STEP, 'kwargsrepr': done}, done),
            ({'kwargsrepr': "{'a': 1}"}, "{'a': 1}")):
        celery_signals.before_task_publish.send(
            sender='t.do', body=((), {'a': 1}, {}), headers=headers)
        assert headers['kwargsrepr'] == expected


def test_a_retried_step_is_labelled_too(celery_app: Celery, celery_worker: Any,
                                        rds: redis.Redis) -> None:
    """Celery (5.3+) carries our headers into the message ``self.retry()``
    and ``autoretry_for`` send, so ``before_task_publish`` labels it."""
    published: list[tuple[str, int, str]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        published.append((headers['id'], headers['retries'],
                          headers['kwargsrepr']))

    celery_signals.after_task_publish.connect(record, weak=False)
    try:
        res = saga(tasks.flaky.si(name='a', times=1), tasks.do.si(name='b'),
                   app=celery_app).apply_async()
        assert res.wait(timeout=10) is SagaState.COMPLETED
    finally:
        celery_signals.after_task_publish.disconnect(record)
    s0 = [(retries, text) for tid, retries, text in published
          if tid == f'{res.id}.s0']
    label = f"{{'compensate_saga_id': '{res.id}', 'compensate_step': 0, "
    assert s0 == [(0, f"{label}'name': 'a', 'times': 1}}"),
                  (1, f"{label}'name': 'a', 'times': 1}}")]


# -- the task-compensation_failed event -------------------------------------

def test_the_event_is_sent_only_where_task_events_are_on(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = Celery('flower-gate', broker=redis_url, set_as_current=False)
    other = Celery('flower-gate-other', broker=redis_url, set_as_current=False)
    state = install(app)
    install(other)
    sent: list[tuple[Any, ...]] = []
    monkeypatch.setattr(monitoring, 'send_compensation_failed',
                        lambda *args, **kw: sent.append((*args, kw)))
    fire = {'saga_id': 's', 'step': 0, 'error': 'boom'}
    signals.compensation_failed.send(sender=app, **fire)
    assert sent == []  # a worker without -E, or not a worker
    state.task_events, state.hostname = True, 'w1@host'
    signals.compensation_failed.send(sender=app, **fire)
    signals.compensation_failed.send(sender=other, **fire)
    assert sent == [(app, 's', 0, 'boom', {'hostname': 'w1@host'})]
    other.conf.worker_send_task_events = True
    signals.compensation_failed.send(sender=other, **fire)
    assert sent[1][0] is other
    app.close()
    other.close()


def test_sending_the_event_never_raises_nor_blocks_long(
        monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    # not caplog: a worker started earlier in the session may have stopped
    # celery's loggers from propagating
    monkeypatch.setattr(monitoring.logger, 'warning',
                        lambda msg, *args, **_: warnings.append(msg % args))
    nowhere = f'redis://127.0.0.1:{free_port()}/0'
    app = Celery('flower-down', broker=nowhere, set_as_current=False)
    app.conf.compensate_redis_socket_timeout = 0.5
    install(app)
    start = time.monotonic()
    thread = send_compensation_failed(app, 's', 0, 'boom', timeout=0.5)
    # back after its timeout (with room for a loaded machine), not after
    # kombu's connection retries, which never end while the broker is down
    assert time.monotonic() - start < 0.5 + 1.0
    thread.join(SEND_TIMEOUT + 10)
    assert not thread.is_alive()
    assert any(f'could not send the {COMPENSATION_FAILED_EVENT} event' in w
               for w in warnings), warnings
    app.close()
