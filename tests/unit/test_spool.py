"""The worker's spool of unrecorded completions (on disk, no Redis)."""
from __future__ import annotations

from celery_compensate.spool import Spool, Unrecorded


def test_the_spool_keeps_completions_until_removed(tmp_path):
    spool = Spool(tmp_path / 'w')
    assert spool.entries() == []                # no directory yet
    first = Unrecorded('s1.s0', 's1', 0, 'tok1', '"r"')
    second = Unrecorded('s2.s3', 's2', 3, 'tok2', '{"a": 1}')
    spool.put(first)
    spool.put(second)
    assert {e.task_id for e in spool.entries()} == {'s1.s0', 's2.s3'}
    assert first in spool.entries()
    spool.remove('s1.s0')
    assert spool.entries() == [second]


def test_an_unreadable_entry_is_set_aside(tmp_path):
    spool = Spool(tmp_path)
    (tmp_path / 'x.json').write_text('{not json')
    spool.put(Unrecorded('ok', 's', 0, 't', 'null'))
    assert [e.task_id for e in spool.entries()] == ['ok']
    assert (tmp_path / 'x.bad').exists()
    assert [e.task_id for e in spool.entries()] == ['ok']


def test_a_worker_has_a_spool_a_client_has_none():
    assert Spool.of_worker('cc', None) is None
    spool = Spool.of_worker('cc', 'w1@host/x')
    assert spool is not None and spool.directory.name == 'cc-w1@host_x'
