"""The ``compensate_*`` settings, read once per app into a frozen object.

=================================== ======================= ==========================================
Setting                             Default                 Meaning
=================================== ======================= ==========================================
``compensate_redis_url``            the broker URL, when it Redis holding the saga records: one
                                    is a Redis or Sentinel  server, a Redis Cluster
                                    URL                     (``redis+cluster://``) or the primary
                                                            behind Sentinels (``sentinel://``)
``compensate_redis_transport_options`` ``{}``               ``master_name`` (required with a
                                                            ``sentinel://`` URL), ``sentinel_kwargs``,
                                                            ``min_other_sentinels``
``compensate_key_prefix``           ``"compensate"``        prefix of every key the store writes
``compensate_result_expires``       ``86400`` (1 day)       seconds a ``COMPLETED``/``COMPENSATED``
                                                            saga is kept; failed compensations never
                                                            expire
``compensate_undo_queue``           ``None``                queue undo tasks are sent to (``None``:
                                                            the undo task's normal routing)
``compensate_undo_max_attempts``    ``6``                   attempts per undo before the saga becomes
                                                            ``COMPENSATION_FAILED``
``compensate_undo_retry_backoff``   ``0.5``                 seconds before the 2nd attempt; doubles
``compensate_undo_retry_backoff_max`` ``30.0``              cap of the delay between attempts
``compensate_redis_socket_timeout`` ``5.0``                 socket timeout of the store's connection
``compensate_record_retry_timeout`` ``30.0``                how long a worker keeps trying to record a
                                                            completed step or undo while Redis is
                                                            unreachable
``compensate_step_timeout``         ``300.0``               the lease of a step or undo a worker holds:
                                                            seconds without a renewal (its worker is
                                                            gone) before the recovery sweep acts; the
                                                            task option ``compensate_timeout``
                                                            overrides it
``compensate_queue_timeout``        ``1800.0``              seconds a step or undo may wait in the
                                                            broker before any worker takes it (plus
                                                            its countdown) before it counts as lost
``compensate_heartbeat_interval``   ``10.0``                how often each worker renews the leases of
                                                            the saga tasks it holds
``compensate_recovery_interval``    ``10.0``                how often the recovery sweep runs (one
                                                            worker at a time)
=================================== ======================= ==========================================
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .clients import (
    CLUSTER_SCHEMES, SENTINEL_SCHEMES, is_cluster_url, is_sentinel_url,
    parse_cluster_url, parse_sentinel_url, sanitize_url,
)
from .exceptions import ImproperlyConfigured

__all__ = ('Settings', 'DEFAULTS')

DEFAULTS: dict[str, Any] = {
    'compensate_redis_url': None,
    'compensate_redis_transport_options': {},
    'compensate_key_prefix': 'compensate',
    'compensate_result_expires': 86400,
    'compensate_undo_queue': None,
    'compensate_undo_max_attempts': 6,
    'compensate_undo_retry_backoff': 0.5,
    'compensate_undo_retry_backoff_max': 30.0,
    'compensate_redis_socket_timeout': 5.0,
    'compensate_record_retry_timeout': 30.0,
    'compensate_step_timeout': 300.0,
    'compensate_queue_timeout': 1800.0,
    'compensate_heartbeat_interval': 10.0,
    'compensate_recovery_interval': 10.0,
}

_REDIS_SCHEMES = ('redis://', 'rediss://', 'redis+socket://', 'unix://')
_STORE_SCHEMES = _REDIS_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES

#: what ``compensate_redis_transport_options`` may hold (the Sentinel
#: options of Celery's and kombu's transport options)
_TRANSPORT_OPTIONS = ('master_name', 'sentinel_kwargs', 'min_other_sentinels')


@dataclass(frozen=True)
class Settings:
    """Validated ``compensate_*`` settings of one app."""

    redis_url: str = field(repr=False)  # may hold a password
    key_prefix: str
    result_expires: int
    undo_queue: str | None
    undo_max_attempts: int
    undo_retry_backoff: float
    undo_retry_backoff_max: float
    redis_socket_timeout: float
    record_retry_timeout: float
    step_timeout: float
    queue_timeout: float
    heartbeat_interval: float
    recovery_interval: float
    #: ``master_name``, ``sentinel_kwargs``, ``min_other_sentinels`` (read
    #: only; ``sentinel_kwargs`` may hold a password)
    redis_transport_options: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), repr=False,
        compare=False)

    @property
    def min_lease(self) -> float:
        """The shortest lease the sweep can tell from a Redis outage."""
        return 2 * self.heartbeat_interval + 2 * self.recovery_interval

    @property
    def safe_redis_url(self) -> str:
        """The Redis URL with any password masked, for logs and errors."""
        return sanitize_url(self.redis_url)

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Settings:
        """Read and validate the settings from an app's ``conf``.

        Raises:
            ImproperlyConfigured: naming the setting that is wrong.
        """
        def get(key: str) -> Any:
            value = conf.get(key)
            return DEFAULTS[key] if value is None else value

        url = get('compensate_redis_url')
        options = _transport_options(get('compensate_redis_transport_options'))
        if not url:
            url = _redis_broker_url(conf)
            if url and is_sentinel_url(url):
                # the broker's Sentinels: their options too, unless ours
                # say otherwise
                broker = conf.get('broker_transport_options') or {}
                options = _transport_options({
                    **{k: broker[k] for k in _TRANSPORT_OPTIONS
                       if isinstance(broker, Mapping) and k in broker},
                    **options}, 'broker_transport_options')
        if not url:
            raise ImproperlyConfigured(
                'compensate_redis_url is not set and the broker URL is not a '
                'Redis or Sentinel URL: set compensate_redis_url = '
                '"redis://host:6379/0"')
        _check_url(url, options)
        prefix = get('compensate_key_prefix')
        _require(isinstance(prefix, str) and bool(prefix) and not
                 set('{} \t\n') & set(prefix), 'compensate_key_prefix',
                 'a non-empty string without braces or spaces', prefix)
        expires = get('compensate_result_expires')
        if isinstance(expires, datetime.timedelta):
            expires = expires.total_seconds()
        _require(_is_number(expires) and expires > 0,
                 'compensate_result_expires', 'a positive number of seconds '
                 'or a timedelta', expires)
        queue = get('compensate_undo_queue')
        _require(queue is None or (isinstance(queue, str) and bool(queue)),
                 'compensate_undo_queue', 'a queue name or None', queue)
        attempts = get('compensate_undo_max_attempts')
        _require(isinstance(attempts, int) and not isinstance(attempts, bool)
                 and attempts >= 1, 'compensate_undo_max_attempts',
                 'an integer >= 1', attempts)
        backoff = get('compensate_undo_retry_backoff')
        _require(_is_number(backoff) and backoff >= 0,
                 'compensate_undo_retry_backoff', 'a number of seconds >= 0',
                 backoff)
        backoff_max = get('compensate_undo_retry_backoff_max')
        _require(_is_number(backoff_max) and backoff_max >= backoff,
                 'compensate_undo_retry_backoff_max',
                 'a number of seconds >= compensate_undo_retry_backoff',
                 backoff_max)
        timeout = get('compensate_redis_socket_timeout')
        _require(_is_number(timeout) and timeout > 0,
                 'compensate_redis_socket_timeout', 'a positive number',
                 timeout)
        record = get('compensate_record_retry_timeout')
        _require(_is_number(record) and record >= 0,
                 'compensate_record_retry_timeout', 'a number of seconds >= 0',
                 record)
        heartbeat = get('compensate_heartbeat_interval')
        _require(_is_number(heartbeat) and heartbeat > 0,
                 'compensate_heartbeat_interval', 'a positive number of '
                 'seconds', heartbeat)
        sweep = get('compensate_recovery_interval')
        _require(_is_number(sweep) and sweep > 0,
                 'compensate_recovery_interval', 'a positive number of '
                 'seconds', sweep)
        # a Redis outage long enough to lapse a lease must be longer than
        # the sweep's gap detection (2 intervals), plus a heartbeat
        minimum = 2 * heartbeat + 2 * sweep
        step_timeout = get('compensate_step_timeout')
        _require(_is_number(step_timeout) and step_timeout >= minimum,
                 'compensate_step_timeout', 'a number of seconds of at least '
                 '2 x compensate_heartbeat_interval + 2 x '
                 f'compensate_recovery_interval ({minimum:g}s)', step_timeout)
        queue_timeout = get('compensate_queue_timeout')
        _require(_is_number(queue_timeout) and queue_timeout >= minimum,
                 'compensate_queue_timeout', 'a number of seconds of at least '
                 f'{minimum:g}', queue_timeout)
        return cls(
            redis_url=url, key_prefix=prefix,
            result_expires=max(1, int(expires)), undo_queue=queue,
            undo_max_attempts=attempts, undo_retry_backoff=float(backoff),
            undo_retry_backoff_max=float(backoff_max),
            redis_socket_timeout=float(timeout),
            record_retry_timeout=float(record),
            step_timeout=float(step_timeout),
            queue_timeout=float(queue_timeout),
            heartbeat_interval=float(heartbeat),
            recovery_interval=float(sweep),
            redis_transport_options=options,
        )


def _redis_broker_url(conf: Mapping[str, Any]) -> str | None:
    url = conf.get('broker_url')
    if isinstance(url, (list, tuple)):
        url = ';'.join(u for u in url if isinstance(u, str)) or None
    if isinstance(url, str):
        if is_sentinel_url(url):
            # kombu's list of Sentinels: all of them
            return ';'.join(u.strip() for u in url.split(';')
                            if is_sentinel_url(u))
        url = url.split(';')[0].strip()
        if url.startswith(_REDIS_SCHEMES):
            return url
    return None


def _transport_options(value: Any, key: str = 'compensate_redis_transport_'
                       'options') -> Mapping[str, Any]:
    """Validate the transport options; a read-only copy."""
    _require(isinstance(value, Mapping), key, 'a dict', type(value).__name__)
    unknown = sorted(str(k) for k in value if k not in _TRANSPORT_OPTIONS)
    if unknown and key != 'broker_transport_options':
        raise ImproperlyConfigured(
            f'{key} has unknown keys {unknown}: it takes '
            f'{", ".join(_TRANSPORT_OPTIONS)}')
    options: dict[str, Any] = {}
    if 'master_name' in value:
        name = value['master_name']
        _require(isinstance(name, str) and bool(name), f"{key}['master_name']",
                 'a non-empty string', name)
        options['master_name'] = name
    if 'sentinel_kwargs' in value:
        kwargs = value['sentinel_kwargs']
        # never shown: it may hold the Sentinels' password
        _require(kwargs is None or (isinstance(kwargs, Mapping) and all(
            isinstance(k, str) for k in kwargs)), f"{key}['sentinel_kwargs']",
            'a dict of redis-py connection options',
            f'a {type(kwargs).__name__}')
        options['sentinel_kwargs'] = MappingProxyType(dict(kwargs or {}))
    if 'min_other_sentinels' in value:
        count = value['min_other_sentinels']
        _require(isinstance(count, int) and not isinstance(count, bool)
                 and count >= 0, f"{key}['min_other_sentinels']",
                 'an integer >= 0', count)
        options['min_other_sentinels'] = count
    return MappingProxyType(options)


def _check_url(url: Any, options: Mapping[str, Any]) -> None:
    """Raises: ImproperlyConfigured naming what is wrong (password masked)."""
    _require(isinstance(url, str) and url.startswith(_STORE_SCHEMES),
             'compensate_redis_url', 'a redis://, rediss://, redis+socket://, '
             'redis+cluster://, rediss+cluster:// or sentinel:// URL',
             sanitize_url(str(url)))
    try:
        if is_cluster_url(url):
            parse_cluster_url(url)
        elif is_sentinel_url(url):
            parse_sentinel_url(url)
    except ValueError as exc:
        raise ImproperlyConfigured(
            f'compensate_redis_url {sanitize_url(url)!r} cannot be used: '
            f'{exc}') from None
    if is_sentinel_url(url) and not options.get('master_name'):
        raise ImproperlyConfigured(
            f"compensate_redis_transport_options['master_name'] is not set: a "
            f'sentinel:// URL ({sanitize_url(url)}) needs the name the '
            "Sentinels monitor the primary under, e.g. "
            "compensate_redis_transport_options = {'master_name': 'mymaster'} "
            "(with the broker's Sentinels, broker_transport_options' "
            'master_name is used)')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ImproperlyConfigured(f'{key} must be {expected}, got {got!r}')
