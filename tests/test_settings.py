"""Settings: defaults, and a clear error naming the key that is wrong."""
from __future__ import annotations

import datetime

import pytest

from celery_compensate.exceptions import ImproperlyConfigured
from celery_compensate.model import undo_delay
from celery_compensate.settings import Settings


def test_defaults_follow_a_redis_broker():
    s = Settings.from_conf({'broker_url': 'redis://h:1/2'})
    assert s.redis_url == 'redis://h:1/2' and s.key_prefix == 'compensate'
    assert s.result_expires == 86400 and s.undo_queue is None


def test_default_undo_retry_policy_suits_an_interactive_system():
    s = Settings.from_conf({'broker_url': 'redis://h'})
    delays = [undo_delay(a, s.undo_retry_backoff, s.undo_retry_backoff_max)
              for a in range(1, s.undo_max_attempts)]
    assert s.undo_max_attempts >= 5
    assert delays[0] <= 1.0                        # first retry within ~1 s
    assert delays[1] == 2 * delays[0]              # doubling
    assert undo_delay(50, s.undo_retry_backoff,
                      s.undo_retry_backoff_max) == s.undo_retry_backoff_max


@pytest.mark.parametrize('conf, culprit', [
    ({'broker_url': 'amqp://x'}, 'compensate_redis_url is not set'),
    ({'compensate_redis_url': 'http://x'}, 'compensate_redis_url must be'),
    ({'broker_url': 'redis://x', 'compensate_key_prefix': 'a{b}'},
     'compensate_key_prefix'),
    ({'broker_url': 'redis://x', 'compensate_undo_max_attempts': 0},
     'compensate_undo_max_attempts'),
    ({'broker_url': 'redis://x', 'compensate_undo_retry_backoff': '1'},
     'compensate_undo_retry_backoff must'),
    ({'broker_url': 'redis://x', 'compensate_result_expires': -1},
     'compensate_result_expires'),
    ({'broker_url': 'redis://x', 'compensate_undo_queue': 3},
     'compensate_undo_queue'),
    ({'broker_url': 'redis://x', 'compensate_step_timeout': 5,
      'compensate_heartbeat_interval': 10},
     r'compensate_step_timeout must be .* at least 2 x compensate_heartbeat'
     r'_interval \+ 2 x compensate_recovery_interval \(40s\), got 5'),
    ({'broker_url': 'redis://x', 'compensate_heartbeat_interval': 0},
     'compensate_heartbeat_interval must be'),
    ({'broker_url': 'redis://x', 'compensate_recovery_interval': '10'},
     'compensate_recovery_interval must be'),
])
def test_bad_settings_name_the_key(conf, culprit):
    with pytest.raises(ImproperlyConfigured, match=culprit):
        Settings.from_conf(conf)


def test_timedelta_and_password_masking():
    s = Settings.from_conf({
        'compensate_redis_url': 'redis://user:pw@h:1/0',
        'compensate_result_expires': datetime.timedelta(hours=1)})
    assert s.result_expires == 3600 and 'pw' not in s.safe_redis_url
    assert 'pw' not in repr(s)


def test_recovery_defaults():
    s = Settings.from_conf({'broker_url': 'redis://h'})
    assert (s.step_timeout, s.queue_timeout, s.heartbeat_interval,
            s.recovery_interval) == (300.0, 1800.0, 10.0, 10.0)
