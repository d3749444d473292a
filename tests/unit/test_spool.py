"""The worker's spool of unrecorded completions (on disk, no Redis)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
    assert spool is not None
    assert spool.directory.name == f'celery-compensate-{os.geteuid()}-cc-w1@host_x'


def test_an_entry_is_recorded_by_one_process_only(tmp_path):
    """Two workers under one node name share a spool: the one that claims
    an entry records it; the other skips it."""
    spool = Spool(tmp_path / 'w')
    spool.put(Unrecorded('s.s0', 's', 0, 't', 'null'))
    assert spool.claim('s.s0')
    assert not spool.claim('s.s0') and spool.entries() == []
    spool.unclaim('s.s0')                   # the store was still away
    assert [e.task_id for e in spool.entries()] == ['s.s0']
    assert spool.claim('s.s0')
    spool.remove('s.s0')
    assert spool.entries() == [] and list((tmp_path / 'w').iterdir()) == []


def test_a_directory_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / 'shared'
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (shared / 'forged.json').write_text(json.dumps(
        {'task_id': 'x', 'saga_id': 'x', 'index': 0, 'token': 't',
         'result': '"forged"'}))
    spool = Spool(shared)
    assert spool.entries() == []            # never trusted
    with pytest.raises(PermissionError, match='not a private directory'):
        spool.put(Unrecorded('s.s0', 's', 0, 't', 'null'))


def test_a_claim_or_a_write_left_by_a_dead_process_is_taken_back(tmp_path):
    """A worker killed while it recorded an entry (claimed) or while its
    child wrote one: a restarted worker under the same node name records
    the claimed entry and drops the half-written file."""
    spool = Spool(tmp_path / 'w')
    spool.put(Unrecorded('s.s0', 's', 0, 't', 'null'))
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    os.replace(tmp_path / 'w' / 's.s0.json',
               tmp_path / 'w' / f's.s0.{dead.pid}')          # its claim
    (tmp_path / 'w' / f's.s1.json.{dead.pid}.tmp').write_text('{"task')
    assert [e.task_id for e in spool.entries()] == ['s.s0']
    assert sorted(p.name for p in (tmp_path / 'w').iterdir()) == ['s.s0.json']
    # a live process's claim is left alone
    assert spool.claim('s.s0') and spool.entries() == []
