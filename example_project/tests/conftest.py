"""The shop's tests use celery_compensate's test kit: a real Redis, a real
worker in this process, the shop's own app and tasks."""
from __future__ import annotations

from typing import Iterator

import pytest
import redis

from example_project import shop

pytest_plugins = ('celery_compensate.contrib.pytest',)

STOCK, BALANCE, COURIERS = 10, 500, 3
CUSTOMERS = {
    'ada': {'email': 'ada@example.org', 'taxid': 'DE123'},
    'bob': {'email': 'bob@example.org'},            # no tax id: no invoice
}


@pytest.fixture
def compensate_celery_app():
    """The app under test: the shop's (the kit points it at the test
    Redis, with a key prefix of its own, for each test)."""
    return shop.app


@pytest.fixture
def books(compensate_redis_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[shop.Books]:
    """The shop open with fresh books, its data in the test Redis (the
    kit points the app at it; the shop's own client is ours to move), no
    simulated latency."""
    db = redis.Redis.from_url(compensate_redis_url, decode_responses=True)
    monkeypatch.setattr(shop, 'db', db)
    monkeypatch.setattr(shop, 'LATENCY', 0)
    opening = shop.Books(stock={'sku-1': STOCK},
                         balances={name: BALANCE for name in CUSTOMERS},
                         couriers={'berlin': COURIERS})
    shop.open_shop(opening, CUSTOMERS)
    yield opening
    keys = list(db.scan_iter('shop:*', count=1000))
    if keys:
        db.delete(*keys)
    db.close()
