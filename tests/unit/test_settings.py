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
    assert 1.0 <= delays[0] <= 2.0                 # first retry after ~1 s
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
    ({'broker_url': 'redis://x', 'compensate_undo_max_attempts': 1},
     r'compensate_undo_max_attempts must be an integer >= 2 \(a first '
     r'attempt and at least one retry\), got 1'),
    ({'broker_url': 'redis://x', 'compensate_undo_retry_backoff': '1'},
     'compensate_undo_retry_backoff must'),
    ({'broker_url': 'redis://x', 'compensate_result_expires': -1},
     'compensate_result_expires'),
    ({'broker_url': 'redis://x', 'compensate_undo_queue': 3},
     'compensate_undo_queue'),
    ({'broker_url': 'redis://x', 'compensate_step_timeout': 5,
      'compensate_heartbeat_interval': 10,
      'compensate_recovery_interval': 10},
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


# -- Redis Cluster and Sentinel URLs -----------------------------------------

def test_a_redis_cluster_url_names_every_startup_node():
    from celery_compensate.clients import LazyRedisCluster, parse_cluster_url
    from celery_compensate.store import make_client
    url = 'redis+cluster://app:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002'
    s = Settings.from_conf({'compensate_redis_url': url})
    assert s.redis_url == url and s.safe_redis_url == (
        'redis+cluster://app:**@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002')
    nodes, options = parse_cluster_url(url)
    assert nodes == [('10.0.0.1', 7000), ('10.0.0.2', 7001), ('::1', 7002)]
    assert options == {'username': 'app', 'password': 'pw'}
    nodes, options = parse_cluster_url(
        'rediss+cluster://:pw@h1,h2:7001/0?ssl_cert_reqs=none')
    assert nodes == [('h1', 6379), ('h2', 7001)]
    assert options == {'password': 'pw', 'ssl': True, 'ssl_cert_reqs': 'none'}
    # made on first use: no node is reached here
    assert isinstance(make_client(s), LazyRedisCluster)


def test_a_sentinel_url_takes_its_master_name_from_transport_options():
    from redis.sentinel import SentinelConnectionPool

    from celery_compensate.clients import parse_sentinel_url
    from celery_compensate.store import make_client
    url = 'sentinel://:pw@s1:26379/2;sentinel://:pw@s2:26380/2;sentinel://s3'
    s = Settings.from_conf({
        'compensate_redis_url': url,
        'compensate_redis_transport_options': {
            'master_name': 'mymaster', 'sentinel_kwargs': {'password': 'sp'},
            'min_other_sentinels': 1}})
    assert s.redis_transport_options['master_name'] == 'mymaster'
    assert s.safe_redis_url == ('sentinel://:**@s1:26379/2;'
                                'sentinel://:**@s2:26380/2;sentinel://s3')
    assert 'pw' not in repr(s) and 'sp' not in repr(s)
    hosts, options = parse_sentinel_url(url)
    assert hosts == [('s1', 26379), ('s2', 26380), ('s3', 26379)]
    assert options == {'password': 'pw', 'db': 2}
    client = make_client(s)
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.service_name == 'mymaster'
    # read once, and read-only
    with pytest.raises(TypeError):
        s.redis_transport_options['master_name'] = 'other'  # type: ignore
    with pytest.raises(TypeError):
        s.redis_transport_options['sentinel_kwargs']['password'] = 'x'


def test_a_sentinel_broker_is_the_default_store_with_its_master_name():
    s = Settings.from_conf({
        'broker_url': 'sentinel://:pw@s1:26379/0; sentinel://:pw@s2:26379/0',
        'broker_transport_options': {'master_name': 'brokermaster',
                                     'visibility_timeout': 3600}})
    assert s.redis_url == 'sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0'
    assert dict(s.redis_transport_options) == {'master_name': 'brokermaster'}
    # ours win over the broker's
    s = Settings.from_conf({
        'broker_url': ['sentinel://s1:26379', 'sentinel://s2:26379'],
        'broker_transport_options': {'master_name': 'brokermaster'},
        'compensate_redis_transport_options': {'master_name': 'ours'}})
    assert s.redis_url == 'sentinel://s1:26379;sentinel://s2:26379'
    assert s.redis_transport_options['master_name'] == 'ours'


@pytest.mark.parametrize('conf, culprit', [
    ({'compensate_redis_url': 'sentinel://:pw@s1:26379/0'},
     (r"compensate_redis_transport_options\['master_name'\] is not set: a "
      r'sentinel:// URL \(sentinel://:\*\*@s1:26379/0\)')),
    ({'broker_url': 'sentinel://s1:26379'},
     (r"compensate_redis_transport_options\['master_name'\] is not set.*"
      r"broker_transport_options' master_name is used")),
    ({'broker_url': 'redis://x', 'compensate_redis_transport_options': []},
     r"compensate_redis_transport_options must be a dict, got 'list'"),
    ({'broker_url': 'redis://x', 'compensate_redis_transport_options': {
        'master': 'm'}},
     (r"compensate_redis_transport_options has unknown keys \['master'\]: it "
      r'takes master_name, sentinel_kwargs, min_other_sentinels')),
    ({'broker_url': 'redis://x', 'compensate_redis_transport_options': {
        'master_name': ''}},
     (r"compensate_redis_transport_options\['master_name'\] must be a "
      r'non-empty string')),
    ({'broker_url': 'redis://x', 'compensate_redis_transport_options': {
        'sentinel_kwargs': 'password=pw'}},
     (r"compensate_redis_transport_options\['sentinel_kwargs'\] must be a dict "
      r"of redis-py connection options, got 'a str'")),
    ({'broker_url': 'redis://x', 'compensate_redis_transport_options': {
        'min_other_sentinels': -1}},
     (r"compensate_redis_transport_options\['min_other_sentinels'\] must be an "
      r'integer >= 0')),
    ({'broker_url': 'sentinel://s1', 'broker_transport_options': {
        'master_name': 5}},
     r"broker_transport_options\['master_name'\] must be a non-empty string"),
    ({'compensate_redis_url': 'redis+cluster://:pw@h1:7000/3'},
     (r"compensate_redis_url 'redis\+cluster://:\*\*@h1:7000/3' cannot be "
      r'used: a Redis Cluster has only database 0')),
    ({'compensate_redis_url': 'redis+cluster://:pw@h1:port'},
     r"cannot be used: 'h1:port' has no valid port"),
    ({'compensate_redis_url': 'rediss+cluster://:pw@'},
     r"'rediss\+cluster://:\*\*@' cannot be used: it names no host"),
    ({'compensate_redis_url': 'sentinel://:pw@s1:1;redis://:pw@h'},
     r'cannot be used: every URL of the list must be a sentinel:// URL'),
    ({'compensate_redis_url': 'cluster://:pw@h1:7000'},
     (r"compensate_redis_url must be a redis://, .* or sentinel:// URL, got "
      r"'cluster://:\*\*@h1:7000'")),
])
def test_bad_cluster_and_sentinel_settings_name_the_key(conf, culprit):
    with pytest.raises(ImproperlyConfigured, match=culprit) as info:
        Settings.from_conf(conf)
    assert 'pw' not in str(info.value)


def test_every_password_is_masked():
    from celery_compensate.clients import sanitize_url
    assert sanitize_url('redis://u:pw@h:1/0?password=pw2&db=1') == (
        'redis://u:**@h:1/0?password=**&db=1')
    assert sanitize_url('sentinel://u:a@b@s1;sentinel://:c@s2/1') == (
        'sentinel://u:**@s1;sentinel://:**@s2/1')
    assert sanitize_url('redis://h:1/0') == 'redis://h:1/0'
    sock = 'redis+socket:///tmp/r.sock'
    assert sanitize_url(sock) == sock


@pytest.mark.parametrize('step_timeout, interval', [
    (None, 10.0), (300, 10.0), (60, 10.0), (6, 1.0), (1.2, 0.2)])
def test_a_step_timeout_alone_gives_a_working_configuration(step_timeout,
                                                            interval):
    """The heartbeat and the sweep interval follow a short step timeout
    (a sixth of it, at most 10 s) unless they are set, so a lease of t
    seconds is found lapsed within t + t/6."""
    conf = {'broker_url': 'redis://x'}
    if step_timeout is not None:
        conf['compensate_step_timeout'] = step_timeout
    s = Settings.from_conf(conf)
    assert s.heartbeat_interval == s.recovery_interval == pytest.approx(
        interval)
    assert s.step_timeout >= s.min_lease


def test_an_interval_set_explicitly_is_kept():
    s = Settings.from_conf({'broker_url': 'redis://x',
                            'compensate_step_timeout': 6,
                            'compensate_heartbeat_interval': 0.5})
    assert (s.heartbeat_interval, s.recovery_interval) == (0.5, 1.0)
