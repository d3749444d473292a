"""What many tests share: polling with a deadline, reading a saga's ledger,
checking the order undos ran in, and short leases for recovery tests."""
from __future__ import annotations

import time

import redis

from . import tasks


def ledger(rds: redis.Redis, app, saga_id: str) -> list[str]:
    return rds.lrange(tasks.ledger_key(app, saga_id), 0, -1)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; fail at the
    deadline with what it last returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'condition not met in {timeout}s: {value!r}')
        time.sleep(interval)


#: short leases so recovery is quick: a lease of 1 s, renewed every 0.2 s
FAST = dict(compensate_step_timeout=1.0, compensate_queue_timeout=1.0,
            compensate_heartbeat_interval=0.2,
            compensate_recovery_interval=0.2)


def undone(entries: list[str]) -> list[str]:
    """Names whose undo finished, in the order they finished."""
    return [e.split(':')[1] for e in entries if e.startswith('undo:')]


def assert_stage_order(entries: list[str], later: set[str], earlier: set[str]):
    """Every undo of ``later`` ended before any undo of ``earlier`` began."""
    ends = [entries.index(e) for e in entries
            if e.startswith('undo:') and e.split(':')[1] in later]
    starts = [entries.index(e) for e in entries
              if e.startswith('undo-start:') and e.split(':')[1] in earlier]
    assert len(ends) == len(later)
    if starts:
        assert max(ends) < min(starts), entries


def assert_one_after_another(entries: list[str], names: list[str]):
    """Each undo in ``names`` began only after the one before it finished."""
    for later, earlier in zip(names, names[1:], strict=False):
        assert_stage_order(entries, {later}, {earlier})
