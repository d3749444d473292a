from __future__ import annotations

import pytest


@pytest.fixture(scope='session')
def compensate_redis_url(redis_url: str) -> str:
    """The suite's Redis (an override, as a user with a Redis of their own
    would write it)."""
    return redis_url
