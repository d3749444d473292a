"""Completions a worker could not record: kept on its disk until its main
process records them.

A forward step whose body returned must be recorded DONE, or its effect
stays in place while the saga compensates without undoing it.  When the
saga store stays unreachable for longer than
``compensate_record_retry_timeout`` the pool child gives up the pool slot,
but first writes the completion here: one small JSON file per task, named
by its task id, in a directory of its worker private to its user (its
node name and key prefix, under the system's temporary directory).  The worker's heartbeat
(:meth:`~celery_compensate.recovery.Recovery.renew`) keeps such a step held
and records it, with the same token, once the store answers; a worker
restarted under the same node name does it too.  A worker that dies with
its disk leaves the step to its lease, like any step of a dead worker.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from celery.utils.log import get_logger

__all__ = ('Unrecorded', 'Spool')

logger = get_logger(__name__)

_UNSAFE = re.compile(r'[^\w.@-]')


@dataclass(frozen=True)
class Unrecorded:
    """A step completion the store did not take.

    Attributes:
        task_id: the step's task id (the file's name).
        saga_id: its saga; ``index`` the step.
        token: the token of the call that was refused: a resend of a call
            that did land answers again instead of counting a duplicate.
        result: the step's result, as JSON.
    """

    task_id: str
    saga_id: str
    index: int
    token: str
    result: str


class Spool:
    """The directory of one worker's unrecorded completions.

    Arguments:
        directory: where the files are (created when first written).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def of_worker(cls, key_prefix: str, hostname: str | None
                  ) -> Spool | None:
        """The spool of the worker ``hostname`` (``None`` outside a
        worker: nobody would record what it holds).  Its directory is
        private to the worker's user: ``<tmp>/celery-compensate-<uid>-
        <prefix>-<node name>``."""
        if not hostname:
            return None
        name = _UNSAFE.sub('_', f'celery-compensate-{os.geteuid()}-'
                                f'{key_prefix}-{hostname}')
        return cls(Path(tempfile.gettempdir()) / name)

    def put(self, entry: Unrecorded) -> None:
        """Write ``entry`` (atomically: a reader sees all of it or none).

        Raises:
            OSError: it could not be written, or the directory is not this
                user's own (another user could read or forge entries).
        """
        self._own_directory()
        path = self._path(entry.task_id)
        temp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, 'O_NOFOLLOW', 0), 0o600)
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump(asdict(entry), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)

    def _own_directory(self) -> None:
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            pass
        if not self._private():
            raise PermissionError(
                f'{self.directory} is not a private directory of this '
                'user: unrecorded completions are not written there')

    def _private(self) -> bool:
        """Whether the directory exists and is this user's alone (not a
        link, nobody else may write or read it)."""
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            return False
        return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
                and not info.st_mode & 0o077)

    def _reclaim(self) -> None:
        """Give back the entries claimed by a process that died before it
        recorded them, and drop the half-written files of one that died
        while writing."""
        try:
            paths = list(self.directory.iterdir())
        except OSError:
            return
        for path in paths:
            owner = _pid_suffix(path.name)
            if owner is None or _alive(owner):
                continue
            try:
                if path.name.endswith('.tmp'):
                    path.unlink()
                else:
                    os.replace(path, path.with_name(
                        path.name.rsplit('.', 1)[0] + '.json'))
            except OSError:
                pass

    def claim(self, task_id: str) -> bool:
        """Take ``task_id``'s entry for recording, so that no other
        process (a second worker under the same node name) records it too.

        Returns:
            bool: ``False`` if another process took it first.
        """
        try:
            os.replace(self._path(task_id), self._claimed(task_id))
            return True
        except FileNotFoundError:
            return False

    def unclaim(self, task_id: str) -> None:
        """Give a claimed entry back (it could not be recorded yet)."""
        try:
            os.replace(self._claimed(task_id), self._path(task_id))
        except FileNotFoundError:
            pass

    def entries(self) -> list[Unrecorded]:
        """Everything waiting to be recorded, oldest first.  A file that
        cannot be read is logged and set aside (``.bad``) for an
        operator."""
        if not self._private():
            return []       # none, or not ours: never trusted (put says why)
        self._reclaim()
        dated = []
        for path in self.directory.glob('*.json'):
            try:
                dated.append((path.stat().st_mtime, path))
            except OSError:
                pass        # claimed by another process meanwhile
        out = []
        for _, path in sorted(dated):
            try:
                out.append(Unrecorded(**json.loads(
                    path.read_text(encoding='utf-8'))))
            except (OSError, ValueError, TypeError) as exc:
                logger.error('celery_compensate: cannot read the unrecorded '
                             'completion %s (%r): set aside as %s for an '
                             'operator', path, exc, path.with_suffix('.bad'))
                try:
                    path.replace(path.with_suffix('.bad'))
                except OSError:
                    pass
        return out

    def remove(self, task_id: str) -> None:
        """Forget ``task_id``'s entry, claimed or not (it was recorded)."""
        self._claimed(task_id).unlink(missing_ok=True)
        self._path(task_id).unlink(missing_ok=True)

    def _path(self, task_id: str) -> Path:
        return self.directory / f'{_UNSAFE.sub("_", task_id)}.json'

    def _claimed(self, task_id: str) -> Path:
        return self.directory / f'{_UNSAFE.sub("_", task_id)}.{os.getpid()}'


def _pid_suffix(name: str) -> int | None:
    """The pid a claimed (``<id>.<pid>``) or half-written
    (``<id>.json.<pid>.tmp``) entry belongs to."""
    parts = name.removesuffix('.tmp').rsplit('.', 1)
    if len(parts) == 2 and parts[1].isdigit() and (
            name.endswith('.tmp') or not name.endswith('.json')):
        return int(parts[1])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
