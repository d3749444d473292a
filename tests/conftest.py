from __future__ import annotations

import uuid
from typing import Iterator

import pytest
import redis

from celery_compensate import install

from . import tasks  # noqa: F401  (shared tasks for every test app)
from celery_compensate.testing import redis_server

pytest_plugins = ('celery.contrib.pytest', 'celery_compensate.contrib.pytest')


@pytest.fixture(scope='session')
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope='session')
def celery_config(redis_url: str) -> dict:
    return {
        'broker_url': redis_url,
        'broker_connection_retry_on_startup': True,
        'worker_hijack_root_logger': False,
        'compensate_undo_retry_backoff': 0.05,
        'compensate_undo_retry_backoff_max': 0.2,
    }


@pytest.fixture(scope='session')
def celery_worker_pool() -> str:
    return 'threads'


@pytest.fixture(scope='session')
def celery_worker_parameters() -> dict:
    # the worker thread is ready once its consumer is; no ping round trip
    return {'concurrency': 4, 'shutdown_timeout': 20,
            'perform_ping_check': False}


@pytest.fixture
def prefix() -> str:
    return f'cctest-{uuid.uuid4().hex[:10]}'


@pytest.fixture
def celery_app(celery_app, prefix: str, request):  # noqa: F811
    """The plugin's app with its own key prefix and queue, installed.

    ``@pytest.mark.compensate_conf(key=value)`` adds settings first.
    """
    marker = request.node.get_closest_marker('compensate_conf')
    extra = {k: v.replace('UNDO_QUEUE', f'{prefix}-undo') if isinstance(v, str)
             else v for k, v in (marker.kwargs if marker else {}).items()}
    celery_app.conf.update(compensate_key_prefix=prefix,
                           task_default_queue=f'{prefix}-q', **extra)
    install(celery_app)
    celery_app.set_current()  # signatures of shared tasks bind to it
    yield celery_app


@pytest.fixture
def rds(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    """A client for assertions; deletes every key the test made."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    keys = list(client.scan_iter(f'{prefix}*', count=1000))
    keys += list(client.scan_iter(f'*{prefix}-q*', count=1000))
    if keys:
        client.delete(*keys)
    client.close()
