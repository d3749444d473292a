"""The ``compensate_*`` settings, read once per app into a frozen object.

Each setting is declared once, as an :class:`Option` of :class:`Settings`:
its key, default, check and documentation. The table in ``docs/settings.md``
and on the Reference page of the docs is generated from those declarations
(``python -m celery_compensate.settings`` prints it).
"""
from __future__ import annotations

import difflib

import datetime
import json
import sys
from dataclasses import FrozenInstanceError
from types import MappingProxyType
from typing import Any, Callable, Generic, Mapping, NoReturn, TypeVar, overload

from .clients import (
    CLUSTER_SCHEMES, SENTINEL_SCHEMES, is_cluster_url, is_sentinel_url,
    parse_cluster_url, parse_sentinel_url, sanitize_url,
)
from .exceptions import ImproperlyConfigured

__all__ = ('Settings', 'Option', 'DEFAULTS', 'settings_table', 'unknown_keys',
           'given', 'SettingWarning')

T = TypeVar('T')

#: validates a value given for a key, returning it converted
Check = Callable[[str, Any], T]

_REDIS_SCHEMES = ('redis://', 'rediss://', 'redis+socket://', 'unix://')
_STORE_SCHEMES = _REDIS_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES

#: what ``compensate_redis_transport_options`` may hold (the Sentinel
#: options of Celery's and kombu's transport options)
_TRANSPORT_OPTIONS = ('master_name', 'sentinel_kwargs', 'min_other_sentinels')

#: the markers around the generated table in docs/settings.md
TABLE_START = '<!-- settings-table:start -->'
TABLE_END = '<!-- settings-table:end -->'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ImproperlyConfigured(f'{key} must be {expected}, got {got!r}')


def _min_lease(heartbeat: float, sweep: float) -> float:
    # a Redis outage long enough to lapse a lease must be longer than the
    # sweep's gap detection (2 intervals), plus a heartbeat
    return 2 * heartbeat + 2 * sweep


#: the longest heartbeat and sweep interval derived from the step timeout
_INTERVAL = 10.0
#: their default as the docs show it
_DERIVED = '`10.0`, or `compensate_step_timeout` / 6 when that is shorter'


def _derived_interval(step_timeout: Any) -> float:
    """The heartbeat and sweep interval when they are not set: 10 s, or
    a sixth of ``compensate_step_timeout`` when that is shorter, so that a
    lease of ``t`` seconds is at least 2 heartbeats + 2 sweeps (``2t/3``)
    and a lost step is found within ``t`` + ``t/6`` seconds."""
    if _is_number(step_timeout) and step_timeout > 0:
        return min(_INTERVAL, float(step_timeout) / 6)
    return _INTERVAL   # the step timeout's own check reports it


def _literal(value: Any) -> str:
    """A default as a Python literal (strings double-quoted)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


class Option(Generic[T]):
    """One setting, declared as a class attribute of :class:`Settings`.

    Read on a :class:`Settings` instance it is the validated value (typed
    ``T``); read on the class it is this declaration.

    Arguments:
        key: the ``app.conf`` key, e.g. ``compensate_step_timeout``.
        default: the value when the key is unset or ``None``.
        check: called with the key and the value; returns the value
            converted, or raises :exc:`ImproperlyConfigured` naming the key.
        doc: what the setting means, one line of Markdown for the docs.
        shown_default: the default as the docs show it, when it is not
            just ``default`` (e.g. computed from another setting).
        secret: left out of ``repr`` (it may hold a password).
    """

    #: the attribute name on :class:`Settings`, e.g. ``step_timeout``
    name: str

    def __init__(self, key: str, default: Any, check: Check[T], doc: str,
                 shown_default: str | None = None,
                 secret: bool = False) -> None:
        self.key = key
        self.default = default
        self.check = check
        self.doc = doc
        self.shown_default = shown_default or f'`{_literal(default)}`'
        self.secret = secret

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Option[T]:
        ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T:
        ...

    def __get__(self, obj: object | None,
                owner: type | None = None) -> Option[T] | T:
        if obj is None:
            return self
        value: T = obj.__dict__[self.name]
        return value

    def __set__(self, obj: object, value: Any) -> NoReturn:
        raise FrozenInstanceError(f'cannot assign to field {self.name!r}')

    def __delete__(self, obj: object) -> NoReturn:
        raise FrozenInstanceError(f'cannot delete field {self.name!r}')

    def lookup(self, conf: Mapping[str, Any]) -> Any:
        """The value in ``conf``, or the default; not checked yet."""
        value = conf.get(self.key)
        return self.default if value is None else value

    def read(self, conf: Mapping[str, Any]) -> T:
        """The checked value in ``conf``, or the default.

        Raises:
            ImproperlyConfigured: naming the key.
        """
        return self.check(self.key, self.lookup(conf))

    def __repr__(self) -> str:
        return f'<Option {self.key}={self.default!r}>'


def _number(expected: str,
            ok: Callable[[float], bool] = lambda value: True) -> Check[float]:
    """A check: a number (not a bool) that passes ``ok``, as a float."""
    def check(key: str, value: Any) -> float:
        _require(_is_number(value) and ok(value), key, expected, value)
        return float(value)
    return check


def _key_prefix(key: str, value: Any) -> str:
    # braces would break the cluster hash tags, spaces the key layout
    _require(isinstance(value, str) and bool(value) and not
             set('{} \t\n') & set(value), key,
             'a non-empty string without braces or spaces', value)
    return str(value)


def _expiry(key: str, value: Any) -> int:
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    _require(_is_number(value) and value > 0, key,
             'a positive number of seconds or a timedelta', value)
    return max(1, int(value))


def _queue_name(key: str, value: Any) -> str | None:
    _require(value is None or (isinstance(value, str) and bool(value)), key,
             'a queue name or None', value)
    return None if value is None else str(value)


def _byte_size(key: str, value: Any) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool)
             and value >= 64, key, 'an integer number of bytes >= 64', value)
    return int(value)


def _attempts(key: str, value: Any) -> int:
    # one attempt would give an undo no retry at all: a revoked copy or a
    # killed worker would end the compensation at once
    _require(isinstance(value, int) and not isinstance(value, bool)
             and value >= 2, key,
             'an integer >= 2 (a first attempt and at least one retry)', value)
    return int(value)


def _depth(key: str, value: Any) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool)
             and value >= 1, key, 'an integer >= 1 (1: no nesting)', value)
    return int(value)


def _flag(key: str, value: Any) -> bool:
    _require(isinstance(value, bool), key, 'True or False', value)
    return bool(value)


def _store_url(key: str, value: Any) -> str:
    """A URL of a store (password masked in errors); parsed if a list."""
    _require(isinstance(value, str) and value.startswith(_STORE_SCHEMES),
             key, 'a redis://, rediss://, redis+socket://, '
             'redis+cluster://, rediss+cluster:// or sentinel:// URL',
             sanitize_url(str(value)))
    try:
        if is_cluster_url(value):
            parse_cluster_url(value)
        elif is_sentinel_url(value):
            parse_sentinel_url(value)
    except ValueError as exc:
        raise ImproperlyConfigured(
            f'{key} {sanitize_url(value)!r} cannot be used: {exc}') from None
    return str(value)


def _transport_options(key: str, value: Any) -> Mapping[str, Any]:
    """Validate the transport options; a read-only copy.

    Also reads the Sentinel options of ``broker_transport_options``, which
    may hold others (Celery's): those are not refused.
    """
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


class Settings:
    """Validated ``compensate_*`` settings of one app (frozen).

    Made by :meth:`from_conf`; every attribute is one :class:`Option`.
    """

    redis_url = Option(
        'compensate_redis_url', None, _store_url, secret=True,
        shown_default='the broker URL if it is a Redis or Sentinel URL',
        doc='Redis holding the saga records: `redis://`, `rediss://`, '
            '`redis+socket://`, a Redis Cluster '
            '`redis+cluster://host:port[,host:port]` (`rediss+cluster://`), '
            'or Sentinels `sentinel://host:26379[;sentinel://...]` (see '
            'Operating: Redis Cluster and Sentinel)')
    #: ``master_name``, ``sentinel_kwargs``, ``min_other_sentinels`` (read
    #: only; ``sentinel_kwargs`` may hold a password)
    redis_transport_options = Option(
        'compensate_redis_transport_options', {}, _transport_options,
        secret=True,
        shown_default='`{}` (a `sentinel://` broker: its '
                      '`broker_transport_options`)',
        doc='for Sentinel: `master_name` (required), `sentinel_kwargs` (the '
            "Sentinels' own connection options, e.g. a password), "
            '`min_other_sentinels`')
    key_prefix = Option(
        'compensate_key_prefix', 'compensate', _key_prefix,
        doc='prefix of every key; a saga is one hash '
            '`<prefix>:{<shard>}:saga:<saga_id>`')
    result_expires = Option(
        'compensate_result_expires', 86400, _expiry,
        doc='seconds a `COMPLETED`/`COMPENSATED` saga is kept (number or '
            '`timedelta`); `COMPENSATION_FAILED` never expires')
    undo_queue = Option(
        'compensate_undo_queue', None, _queue_name,
        doc="queue undo tasks are sent to; `None` uses the undo task's "
            'normal routing. Set it on every worker (undos are sent by '
            'whichever worker records a failure or an undo) and have a worker '
            'consume it (see Operating: Undo routing)')
    result_max_bytes = Option(
        'compensate_result_max_bytes', 65536, _byte_size,
        doc="largest step result stored, in bytes of JSON; a step whose "
            "result is larger (or cannot be encoded) counts as completed "
            "but the saga compensates, and its undo gets a placeholder")
    undo_max_attempts = Option(
        'compensate_undo_max_attempts', 6, _attempts,
        doc='attempts per undo before `COMPENSATION_FAILED`')
    undo_retry_backoff = Option(
        'compensate_undo_retry_backoff', 1.0,
        _number('a number of seconds >= 0', lambda value: value >= 0),
        doc='seconds before the 2nd attempt; doubles after each failure')
    undo_retry_backoff_max = Option(
        'compensate_undo_retry_backoff_max', 30.0,
        # at least undo_retry_backoff: checked by _check_bounds
        _number(f'a number of seconds >= {undo_retry_backoff.key}'),
        doc='cap of the delay between attempts')
    forward_max_attempts = Option(
        'compensate_forward_max_attempts', 6, _attempts,
        doc='after a completed pivot (`compensate_pivot`), attempts per '
            'failing step (each after its own Celery retries) before '
            '`FORWARD_FAILED`; the undo retry backoff spaces them')
    max_depth = Option(
        'compensate_max_depth', 8, _depth,
        doc='how deep sagas may nest (a saga as a step of a saga is 2 '
            'levels); a deeper saga is refused when it is built')
    redis_socket_timeout = Option(
        'compensate_redis_socket_timeout', 5.0,
        _number('a positive number', lambda value: value > 0),
        doc="socket and connect timeout of the store's connection")
    record_retry_timeout = Option(
        'compensate_record_retry_timeout', 30.0,
        _number('a number of seconds >= 0', lambda value: value >= 0),
        doc='seconds a worker keeps resending the record of a completed step '
            'or undo while the store is unreachable')
    # None: derived from compensate_step_timeout (see _derived_interval)
    heartbeat_interval = Option(
        'compensate_heartbeat_interval', None,
        _number('a positive number of seconds', lambda value: value > 0),
        shown_default=_DERIVED,
        doc='how often each worker renews the leases of the saga tasks it '
            'holds')
    recovery_interval = Option(
        'compensate_recovery_interval', None,
        _number('a positive number of seconds', lambda value: value > 0),
        shown_default=_DERIVED,
        doc='how often the sweep runs (one worker at a time)')
    # the two leases: at least min_lease, checked by _check_bounds
    step_timeout = Option(
        'compensate_step_timeout', 300.0, _number('a number of seconds'),
        doc='lease of a step or undo a worker holds: seconds without a '
            'renewal (its worker is gone) before the sweep acts; at least 2 '
            'heartbeats + 2 sweep intervals; the task option '
            '`compensate_timeout` overrides it')
    queue_timeout = Option(
        'compensate_queue_timeout', 1800.0, _number('a number of seconds'),
        doc='seconds a step or undo may wait in the broker before a worker '
            'takes it (plus its countdown/eta) before it counts as lost')
    tracing = Option(
        'compensate_tracing', False, _flag,
        doc='emit OpenTelemetry spans: one per saga, one per step and per '
            'undo attempt (needs `pip install celery-compensate[otel]`; '
            '`install(app, tracing=True)` sets it too; see Tracing)')

    def __init__(self, **values: Any) -> None:
        """Settings as given, not checked: use :meth:`from_conf`.

        Raises:
            TypeError: unless every option, and only those, is given.
        """
        names = [option.name for option in self.options()]
        missing = [name for name in names if name not in values]
        unknown = sorted(set(values) - set(names))
        if missing or unknown:
            raise TypeError(f'Settings() needs every option: missing '
                            f'{missing}, unknown {unknown}')
        self.__dict__.update(values)

    @classmethod
    def options(cls) -> tuple[Option[Any], ...]:
        """Every setting, in the order they are checked and documented."""
        return tuple(value for value in vars(cls).values()
                     if isinstance(value, Option))

    @property
    def min_lease(self) -> float:
        """The shortest lease the sweep can tell from a Redis outage."""
        return _min_lease(self.heartbeat_interval, self.recovery_interval)

    @property
    def safe_redis_url(self) -> str:
        """The Redis URL with any password masked, for logs and errors."""
        return sanitize_url(self.redis_url)

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Settings:
        """Read and validate the settings from an app's ``conf``.

        Arguments:
            conf: the app's ``conf`` (any mapping of setting keys).

        Returns:
            Settings: read-only.

        Raises:
            ImproperlyConfigured: naming the setting that is wrong.
        """
        url_option = cls.redis_url
        options_option = cls.redis_transport_options
        options = options_option.read(conf)
        url = url_option.lookup(conf)
        if not url:
            url = _redis_broker_url(conf)
            if url and is_sentinel_url(url):
                # the broker's Sentinels: their options too, unless ours
                # say otherwise
                broker = conf.get('broker_transport_options') or {}
                options = _transport_options('broker_transport_options', {
                    **{k: broker[k] for k in _TRANSPORT_OPTIONS
                       if isinstance(broker, Mapping) and k in broker},
                    **options})
        if not url:
            raise ImproperlyConfigured(
                f'{url_option.key} is not set and the broker URL is not a '
                f'Redis or Sentinel URL: set {url_option.key} = '
                '"redis://host:6379/0"')
        url = url_option.check(url_option.key, url)
        if is_sentinel_url(url) and not options.get('master_name'):
            raise ImproperlyConfigured(
                f"{options_option.key}['master_name'] is not set: a "
                f'sentinel:// URL ({sanitize_url(url)}) needs the name the '
                'Sentinels monitor the primary under, e.g. '
                f"{options_option.key} = {{'master_name': 'mymaster'}} "
                "(with the broker's Sentinels, broker_transport_options' "
                'master_name is used)')
        values: dict[str, Any] = {url_option.name: url,
                                  options_option.name: options}
        for option in cls.options():
            if option.name not in values:
                value = option.lookup(conf)
                if value is None and option in (cls.heartbeat_interval,
                                                cls.recovery_interval):
                    value = _derived_interval(cls.step_timeout.lookup(conf))
                cls._check_bounds(option, value, values)
                values[option.name] = option.check(option.key, value)
        return cls(**values)

    @classmethod
    def _check_bounds(cls, option: Option[Any], value: Any,
                      values: Mapping[str, Any]) -> None:
        """The checks across settings, of a value as given.

        Run before the option's own check, so that a value of the wrong
        type is told the bound too.

        Arguments:
            option: the setting ``value`` is given for.
            value: as given (or the default).
            values: the settings checked so far, by name.

        Raises:
            ImproperlyConfigured: naming the setting and its bound.
        """
        if option is cls.undo_retry_backoff_max:
            backoff = cls.undo_retry_backoff
            _require(_is_number(value) and value >= values[backoff.name],
                     option.key, f'a number of seconds >= {backoff.key}',
                     value)
        elif option is cls.step_timeout or option is cls.queue_timeout:
            heartbeat, sweep = cls.heartbeat_interval, cls.recovery_interval
            minimum = _min_lease(values[heartbeat.name], values[sweep.name])
            bound = (f'2 x {heartbeat.key} + 2 x {sweep.key} ({minimum:g}s)'
                     if option is cls.step_timeout else f'{minimum:g}')
            _require(_is_number(value) and value >= minimum, option.key,
                     f'a number of seconds of at least {bound}', value)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise FrozenInstanceError(f'cannot assign to field {name!r}')

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenInstanceError(f'cannot delete field {name!r}')

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return vars(self) == vars(other)

    def __hash__(self) -> int:
        # the transport options are mappings: equal settings hash equal
        # without them
        return hash(tuple(value for value in vars(self).values()
                          if not isinstance(value, Mapping)))

    def __repr__(self) -> str:
        shown = ', '.join(f'{option.name}={getattr(self, option.name)!r}'
                          for option in self.options() if not option.secret)
        return f'{type(self).__name__}({shown})'


#: every setting's default, by key (``None``: computed, see the docs)
DEFAULTS: dict[str, Any] = {
    option.key: option.default for option in Settings.options()}


def settings_table() -> str:
    """The Markdown table of every setting, as the docs show it.

    Returns:
        str: a header, and one row per setting in declaration order.
    """
    rows = ['| Setting | Default | Meaning |', '|---|---|---|']
    rows += [f'| `{option.key}` | {_cell(option.shown_default)} | '
             f'{_cell(option.doc)} |' for option in Settings.options()]
    return '\n'.join(rows) + '\n'


def _cell(text: str) -> str:
    return text.replace('|', r'\|')


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


if __name__ == '__main__':  # `python -m celery_compensate.settings`
    sys.stdout.write(settings_table())


class SettingWarning(UserWarning):
    """A ``compensate_*`` setting that is misspelt, or changed after
    ``install(app)`` read the settings (the change is ignored)."""


def unknown_keys(conf: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """The keys of ``conf`` that look like ``compensate_*`` settings (also
    under a namespace, ``CELERY_COMPENSATE_...``) but are none, each with
    the closest setting's key (or ``None``)."""
    known = [option.key for option in Settings.options()]
    out = []
    for key in list(conf.keys()):
        if not isinstance(key, str):
            continue
        name = key.lower()
        at = name.find('compensate_')
        if at < 0 or (at > 0 and not name[:at].endswith('_')):
            continue
        if name[at:] in known:
            continue
        close = difflib.get_close_matches(name[at:], known, n=1, cutoff=0.6)
        out.append((key, close[0] if close else None))
    return out


def given(conf: Mapping[str, Any]) -> dict[str, Any]:
    """Each setting's value as given in ``conf`` (before checks), to tell
    later whether it changed."""
    return {option.key: option.lookup(conf) for option in Settings.options()}
