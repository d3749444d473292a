"""Run a real ``celery worker`` subprocess (prefork pool) for tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A ``celery -A <app> worker`` subprocess; stop() kills what it started."""

    def __init__(self, app_module: str, env: dict[str, str], *args: str,
                 name: str = 'pf') -> None:
        self.log = Path(tempfile.mkstemp(prefix='compensate-worker-',
                                         suffix='.log')[1])
        self.cmd = [sys.executable, '-m', 'celery', '-A', app_module, 'worker',
                    '-n', f'{name}-{os.getpid()}@%h', '-l', 'info',
                    '--without-heartbeat', '--without-mingle',
                    '--without-gossip', *args]
        self.env = {**os.environ, **env, 'PYTHONPATH': str(ROOT)}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=self.log.open('wb'),
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
        self.log.unlink(missing_ok=True)
