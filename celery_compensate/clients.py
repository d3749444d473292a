"""Redis clients for the saga store: one server, a Redis Cluster, or a
primary found through Redis Sentinel.

``compensate_redis_url`` names which:

- ``redis://``, ``rediss://``, ``redis+socket://``/``unix://``: one server;
- ``redis+cluster://[user:password@]host:port[,host:port...]`` (or
  ``rediss+cluster://`` for TLS): a Redis Cluster, found from any of the
  nodes named.  Every script of the store touches the keys of one slot (a
  saga's keys share a hash tag), so they all run on a cluster;
- ``sentinel://[user:password@]host:port[/db][;sentinel://host:port...]``:
  the primary that the Sentinels monitor under the ``master_name`` of
  ``compensate_redis_transport_options``, as Celery and kombu spell it.
  The password in the URL is the primary's; ``sentinel_kwargs`` holds the
  Sentinels' own (e.g. ``{'password': ...}``).
"""
from __future__ import annotations

import threading
import time
from typing import (
    TYPE_CHECKING, Any, Callable, Iterator, Mapping, ParamSpec, TypeVar,
)
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from celery.utils.log import get_logger
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.core import Script
from redis.connection import Connection
from redis.exceptions import (
    NoScriptError, RedisClusterException, SlotNotCoveredError,
)
from redis.lock import Lock
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

if TYPE_CHECKING:
    from redis._parsers import Encoder

__all__ = ('CLUSTER_SCHEMES', 'SENTINEL_SCHEMES', 'is_cluster_url',
           'is_sentinel_url', 'sanitize_url', 'parse_cluster_url',
           'parse_sentinel_url', 'connect', 'LazyRedisCluster',
           'servers', 'SENTINEL_CHECK_INTERVAL', 'SENTINEL_BACKOFF')

# redis-py annotates its plain client but leaves much of the cluster and
# Sentinel code (and parse_url) unannotated: those calls are marked
# `type: ignore[no-untyped-call]`.

logger = get_logger(__name__)

_P = ParamSpec('_P')
_T = TypeVar('_T')

CLUSTER_SCHEMES = ('redis+cluster://', 'rediss+cluster://')
SENTINEL_SCHEMES = ('sentinel://',)

#: Seconds between the checks, when the store's client takes a connection,
#: of which server the Sentinels call the primary.  A Sentinel failover
#: leaves the former primary accepting writes until the Sentinel demotes
#: it (about 10 s later), and whatever it accepts meanwhile is discarded
#: then: so the client must not wait for a ``READONLY`` to move.
SENTINEL_CHECK_INTERVAL = 1.0

#: Seconds the Sentinels are not asked again after none answered.
SENTINEL_BACKOFF = 10.0


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def is_sentinel_url(url: str) -> bool:
    return url.lstrip().startswith(SENTINEL_SCHEMES)


def sanitize_url(url: str) -> str:
    """The URL with every password masked (``**``): also each URL of a
    ``;``-separated Sentinel list, the credentials of a cluster URL with
    several hosts, and a ``password=`` query option."""
    return ';'.join(_sanitize_one(part) for part in url.split(';'))


def _sanitize_one(url: str) -> str:
    scheme, sep, rest = url.partition('://')
    if not sep:
        return url
    end = min([i for i in (rest.find('/'), rest.find('?')) if i >= 0],
              default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition('@')
    if at and ':' in userinfo:
        netloc = f'{userinfo.partition(":")[0]}:**@{hosts}'
    path, qmark, query = tail.partition('?')
    if qmark:
        pairs = [(k, '**' if k.lower() == 'password' else v)
                 for k, v in parse_qsl(query, keep_blank_values=True)]
        tail = f'{path}?{urlencode(pairs, safe="*")}'
    return f'{scheme}://{netloc}{tail}'


def _hosts(text: str, default_port: int) -> list[tuple[str, int]]:
    """``host[:port]`` items, comma separated (``[v6]:port`` allowed)."""
    found = []
    for item in text.split(','):
        item = item.strip()
        if not item:
            continue
        parts = urlsplit(f'//{item}')
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f'{item!r} has no valid port') from None
        if not parts.hostname:
            raise ValueError(f'{item!r} names no host')
        found.append((parts.hostname, port or default_port))
    if not found:
        raise ValueError('it names no host')
    return found


def _netloc(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Split a ``redis+cluster://`` URL into its startup nodes and the
    connection options of every node.

    Raises:
        ValueError: the URL cannot be used (why, without the password).
    """
    if not is_cluster_url(url):
        raise ValueError('it is not a redis+cluster:// or rediss+cluster:// '
                         'URL')
    tls = url.startswith('rediss+')
    rest = url.partition('://')[2]
    end = min([i for i in (rest.find('/'), rest.find('?')) if i >= 0],
              default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition('@')
    nodes = _hosts(hosts, 6379)
    options = redis.connection.parse_url(  # type: ignore[no-untyped-call]
        f'{"rediss" if tls else "redis"}://{userinfo}{at}'
        f'{_netloc(*nodes[0])}{tail}')
    for key in ('host', 'port', 'connection_class'):
        options.pop(key, None)
    if options.pop('db', 0) != 0:
        raise ValueError('a Redis Cluster has only database 0')
    if tls:
        options['ssl'] = True
    return nodes, options


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]],
                                          dict[str, Any]]:
    """Split a ``sentinel://`` URL (or several joined by ``;``, as kombu
    takes them) into the Sentinels' addresses and the options of the
    connections to the primary (its password, user and database come from
    the first URL that has them).

    Raises:
        ValueError: the URL cannot be used (why, without the password).
    """
    sentinels: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in url.split(';'))):
        if not part.startswith(SENTINEL_SCHEMES):
            raise ValueError('every URL of the list must be a sentinel:// URL')
        rest = part.partition('://')[2]
        end = min([i for i in (rest.find('/'), rest.find('?')) if i >= 0],
                  default=len(rest))
        userinfo, at, hosts = rest[:end].rpartition('@')
        found = _hosts(hosts, 26379)
        sentinels.extend(found)
        parsed = redis.connection.parse_url(  # type: ignore[no-untyped-call]
            f'redis://{userinfo}{at}{_netloc(*found[0])}{rest[end:]}')
        for key in ('host', 'port'):
            parsed.pop(key, None)
        for key, value in parsed.items():
            options.setdefault(key, value)
    if not sentinels:
        raise ValueError('it names no Sentinel')
    return sentinels, options


def connect(url: str, transport_options: Mapping[str, Any],
            socket_timeout: float, retries: int = 3) -> Any:
    """The client of the saga store named by ``url``.

    Arguments:
        url: a validated ``compensate_redis_url``.
        transport_options: ``master_name``, ``sentinel_kwargs`` and
            ``min_other_sentinels`` for a Sentinel URL.
        socket_timeout: socket and connect timeout of every connection.
        retries: how often a command whose connection broke is resent.
    Returns:
        a :class:`redis.Redis` (one server, or the primary behind the
        Sentinels) or a :class:`LazyRedisCluster`.
    """
    timeouts = {'socket_timeout': socket_timeout,
                'socket_connect_timeout': socket_timeout}
    # a command whose connection broke is resent briefly (safe: every
    # script call carries a token)
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries)
    if is_cluster_url(url):
        nodes, options = parse_cluster_url(url)

        def factory() -> RedisCluster:
            return RedisCluster(
                startup_nodes=[
                    ClusterNode(h, p)  # type: ignore[no-untyped-call]
                    for h, p in nodes],
                retry=retry, **{**timeouts, **options,
                                'decode_responses': True})

        return LazyRedisCluster(factory)
    if is_sentinel_url(url):
        hosts, options = parse_sentinel_url(url)
        sentinel_kwargs = {
            # the next Sentinel is asked at once (redis-py's default retry
            # backs off for seconds on each)
            'retry': Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
            **timeouts, **(transport_options.get('sentinel_kwargs') or {})}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs=sentinel_kwargs,
            min_other_sentinels=int(transport_options.get(
                'min_other_sentinels', 0)))
        return sentinel.master_for(  # type: ignore[no-untyped-call]
            transport_options['master_name'], redis_class=redis.Redis,
            connection_pool_class=FollowingSentinelPool, **{
                'retry': retry, 'retry_on_error': [redis.ConnectionError,
                                                   redis.TimeoutError],
                'health_check_interval': 30, **timeouts, **options,
                'decode_responses': True})
    if url.startswith('redis+socket://'):
        url = 'unix://' + url[len('redis+socket://'):]
    return redis.Redis.from_url(
        url, decode_responses=True, retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30, **timeouts)


class FollowingSentinelPool(SentinelConnectionPool):
    """The connections to the primary behind the Sentinels, following a
    failover within :data:`SENTINEL_CHECK_INTERVAL` seconds.

    redis-py asks the Sentinels only when it opens a connection, so pooled
    connections keep writing to a former primary until it is demoted (by
    then its writes since the failover are lost).  Here taking a connection
    asks again when the last answer is older than the interval, and a
    connection to a former primary is dropped (and reopened to the current
    one) when it is taken.  When no Sentinel answers, the known primary is
    kept and they are not asked again for :data:`SENTINEL_BACKOFF` seconds,
    so unreachable Sentinels cost one slow call, not one per interval.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel,
                 **kwargs: Any) -> None:
        self.check_interval = kwargs.pop('check_interval',
                                         SENTINEL_CHECK_INTERVAL)
        super().__init__(  # type: ignore[no-untyped-call]
            service_name, sentinel_manager, **kwargs)
        self._checked = float('-inf')

    def get_connection(self, *args: Any, **kwargs: Any) -> Connection:
        now = time.monotonic()
        if self.is_master and now - self._checked >= self.check_interval:
            self._checked = now
            try:
                self.get_master_address()  # type: ignore[no-untyped-call]
                self._checked = time.monotonic()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # the Sentinels are away: keep the primary we know (a new
                # connection needs them and fails as unreachable)
                self._checked = time.monotonic() + SENTINEL_BACKOFF
                logger.debug('celery_compensate: no Sentinel answered: %s', exc)
        connection = super().get_connection(*args, **kwargs)
        address = self.master_address
        if (self.is_master and address is not None and connection.host
                and (connection.host, connection.port) != tuple(address)):
            # reconnects to the current primary
            connection.disconnect()  # type: ignore[no-untyped-call]
        return connection


def _cluster_error(exc: RedisClusterException) -> redis.RedisError:
    """redis-py raises :class:`RedisClusterException`, which is not a
    :class:`redis.RedisError`, also when no node can be reached: make it a
    ``ConnectionError`` then (so it counts as unreachable), else a
    ``RedisError``."""
    text = str(exc)
    if (isinstance(exc, SlotNotCoveredError) or 'cannot be connected' in text
            or 'not covered' in text):
        return redis.ConnectionError(f'Redis Cluster unreachable: {text}')
    return redis.RedisError(text)


def _call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    try:
        return fn(*args, **kwargs)
    except RedisClusterException as exc:
        raise _cluster_error(exc) from exc


class LazyRedisCluster:
    """A :class:`redis.cluster.RedisCluster` made on first use.

    A ``RedisCluster`` connects to its nodes when it is made, and raises if
    none answers; the saga store's client must instead be made while Redis
    is away (a worker starting during an outage) and fail like a lost
    connection when used.  Every method of the cluster client is
    available, raising only :class:`redis.RedisError` (no node reachable:
    :class:`redis.ConnectionError`).  Pipelines also run scripts (redis-py
    refuses ``EVALSHA`` in a cluster pipeline) and reload them after
    ``NOSCRIPT``.

    Arguments:
        factory: makes the cluster client.
    """

    def __init__(self, factory: Callable[[], RedisCluster]) -> None:
        self._factory = factory
        self._cluster: RedisCluster | None = None
        self._lock = threading.Lock()
        # redis.connection has Encoder in every redis-py version (redis 4
        # defines it there) but does not re-export it to mypy
        encoder = redis.connection.Encoder  # type: ignore[attr-defined]
        self._encoder: Encoder = encoder(  # type: ignore[no-untyped-call]
            'utf-8', 'strict', True)
        self._scripts: dict[str, str] = {}

    @property
    def cluster(self) -> RedisCluster:
        """The cluster client (made now if it was not yet).

        Raises:
            redis.ConnectionError: no node can be reached.
        """
        if self._cluster is None:
            with self._lock:
                if self._cluster is None:
                    self._cluster = _call(self._factory)
        return self._cluster

    def __getattr__(self, name: str) -> Any:
        if name.startswith('_'):
            raise AttributeError(name)
        if not callable(getattr(RedisCluster, name, None)):
            return getattr(self.cluster, name)

        # a method: the cluster client is made (and may fail) only when it
        # is called, as a plain client connects only then
        def call(*args: Any, **kwargs: Any) -> Any:
            return _call(lambda: getattr(self.cluster, name)(*args, **kwargs))

        return call

    def get_encoder(self) -> Encoder:
        return self._encoder

    def register_script(self, script: str) -> Script:
        """A script run on the slot of its first key (``EVALSHA``, loaded on
        every primary after ``NOSCRIPT``)."""
        # Script takes a Redis or a RedisCluster; it uses only what this
        # proxy has (get_encoder, evalsha, script_load)
        registered = Script(self, script)  # type: ignore[arg-type]
        self._scripts[registered.sha] = script
        return registered

    def load_scripts(self, shas: set[str]) -> None:
        """``SCRIPT LOAD`` the registered scripts ``shas`` on every primary."""
        for sha in shas:
            if sha in self._scripts:
                _call(self.cluster.script_load, self._scripts[sha])

    def lock(self, name: str, **kwargs: Any) -> Lock:
        """A :class:`redis.lock.Lock` on one key (made without connecting)."""
        return Lock(self, name, **kwargs)

    def pipeline(self, transaction: bool = False,
                 shard_hint: Any = None) -> ClusterScriptPipeline:
        """A pipeline (made without connecting; see
        :class:`ClusterScriptPipeline`)."""
        return ClusterScriptPipeline(self, transaction)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()


class ClusterScriptPipeline:
    """A pipeline of a :class:`LazyRedisCluster`: commands are queued here
    and sent as a :class:`redis.cluster.ClusterPipeline` by
    :meth:`execute` (so queueing never connects, as with one server), in
    one batch per node.

    Scripts are queued too (redis-py refuses ``EVALSHA`` in a cluster
    pipeline): each goes to the node of its first key's slot, and one that
    finds its script missing (``NOSCRIPT``: a node restarted or failed
    over) has the script loaded on every primary and is sent again, so
    :meth:`execute` answers as if it had been there.

    Arguments:
        client: the cluster client.
        transaction: a ``MULTI``/``EXEC`` of commands on one slot.
    """

    def __init__(self, client: LazyRedisCluster,
                 transaction: bool = False) -> None:
        self._client = client
        self._transaction = transaction
        self._queue: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self._queue)

    def __getattr__(self, name: str) -> Any:
        if name.startswith('_') or not callable(
                getattr(ClusterPipeline, name, None)):
            raise AttributeError(name)

        def queue(*args: Any, **kwargs: Any) -> ClusterScriptPipeline:
            self._queue.append((name, args, kwargs))
            return self

        return queue

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any
                ) -> ClusterScriptPipeline:
        self._queue.append(('evalsha', (sha, numkeys, *keys_and_args), {}))
        return self

    def reset(self) -> None:
        self._queue = []

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands; the results in their order.

        Raises:
            redis.ConnectionError: a node (or the cluster) is unreachable,
                whatever ``raise_on_error`` says, as with one server.
            redis.RedisError: the first command that failed, if
                ``raise_on_error``.
        """
        queue, self._queue = self._queue, []
        if not queue:
            return []
        return _call(self._execute, queue, raise_on_error)

    def _execute(self, queue: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
                 raise_on_error: bool) -> list[Any]:
        cluster = self._client.cluster
        pipe: ClusterPipeline
        pipe = cluster.pipeline(  # type: ignore[no-untyped-call]
            transaction=self._transaction)
        for name, args, kwargs in queue:
            if name == 'evalsha':
                self._send_script(cluster, pipe, args)
            else:
                getattr(pipe, name)(*args, **kwargs)
        results = pipe.execute(raise_on_error=False)
        missing = [i for i, result in enumerate(results)
                   if isinstance(result, NoScriptError)
                   and queue[i][0] == 'evalsha']
        if missing:
            self._client.load_scripts({queue[i][1][0] for i in missing})
            again: ClusterPipeline
            again = cluster.pipeline()  # type: ignore[no-untyped-call]
            for i in missing:
                self._send_script(cluster, again, queue[i][1])
            for i, result in zip(missing, again.execute(raise_on_error=False),
                                 strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                raise result
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    @staticmethod
    def _send_script(cluster: RedisCluster, pipe: Any,
                     args: tuple[Any, ...]) -> None:
        options = {}
        if args[1]:
            # the node of the slot, so redis-py need not ask a server for
            # the keys of each EVALSHA (COMMAND GETKEYS); after a MOVED it
            # routes the command again by itself
            options['target_nodes'] = cluster.nodes_manager.get_node_from_slot(
                cluster.keyslot(args[2]))  # type: ignore[no-untyped-call]
        pipe.execute_command('EVALSHA', *args, **options)


def servers(client: Any) -> Iterator[tuple[str | None, redis.Redis]]:
    """The servers that hold the saga store: ``(node name, client)`` for each
    primary of a cluster, else ``(None, client)``."""
    if isinstance(client, LazyRedisCluster):
        cluster = client.cluster
        for node in _call(cluster.get_primaries):
            yield node.name, cluster.get_redis_connection(node)
    else:
        yield None, client
