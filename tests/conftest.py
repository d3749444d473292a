from __future__ import annotations

import uuid
from typing import Iterator

import pytest
import redis

import celery.contrib.testing.tasks  # noqa: F401  (the ping task)
from celery_compensate import install

from . import tasks  # noqa: F401  (shared tasks for every test app)
from .redis_server import redis_server

pytest_plugins = ('celery.contrib.pytest',)


@pytest.fixture(scope='session')
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope='session')
def celery_config(redis_url: str) -> dict:
    return {
        'broker_url': redis_url,
        'result_backend': redis_url,
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
    return {'concurrency': 4, 'shutdown_timeout': 20}


@pytest.fixture
def prefix() -> str:
    return f'cctest-{uuid.uuid4().hex[:10]}'


@pytest.fixture
def celery_app(celery_app, prefix: str, redis_url: str):  # noqa: F811
    """The plugin's app with its own key prefix and queue, installed."""
    celery_app.conf.update(compensate_key_prefix=prefix,
                           task_default_queue=f'{prefix}-q')
    install(celery_app)
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
