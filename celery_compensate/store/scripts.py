"""The store's Lua commands: read from ``lua/``, assembled once, registered
with Redis.

Each command is one file, ``lua/<name>.lua``, whose header lists its KEYS,
ARGV, replies and transitions.  A line ``--- @include "includes/<helper>"``
is replaced by that helper file (whose own includes are replaced the same
way; each file once per command, where it is first included), so a command
carries only the helpers it uses.  The assembled
text is registered with redis-py's ``register_script``, which falls back
to ``EVAL`` when Redis answers ``NOSCRIPT`` (after a restart).

An error raised inside a command names the file and line it came from:
``user_script:57`` in Redis's message becomes
``includes/advance.lua:12 (in step_done)``.

``python -m celery_compensate.store lint`` checks every assembled command
with luacheck (``make lint``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ('COMMANDS', 'Source', 'assemble', 'explain')

#: Every command, by file name (without ``.lua``).
COMMANDS = (
    'start', 'step_done', 'step_failed', 'undo_begin', 'undo_release',
    'undo_done', 'undo_failed', 'undo_sent', 'receive', 'release',
    'confirm', 'renew',
    'recover', 'abort', 'retry', 'scan', 'summary', 'forget',
    'unwind', 'report', 'reported',
)

_INCLUDE = re.compile(r'^--- @include "([\w/]+)"\s*$')
_LINE = re.compile(r'user_script:(\d+)')
_SHA = re.compile(r'\b([0-9a-f]{40})\b')


@dataclass(frozen=True)
class Source:
    """One assembled command.

    Attributes:
        name: the command (its file name without ``.lua``).
        text: the Lua text sent to Redis.
        lines: for each line of ``text``, the file (relative to ``lua/``)
            and line number it comes from.
    """

    name: str
    text: str
    lines: tuple[tuple[str, int], ...]

    def locate(self, line: int) -> str:
        """``file:line`` of line ``line`` (1-based) of the assembled text."""
        if 1 <= line <= len(self.lines):
            path, number = self.lines[line - 1]
            where = f'{path}:{number}'
            return where if path == f'{self.name}.lua' else (
                f'{where} (in {self.name})')
        return f'{self.name}.lua (line {line} of the assembled script)'


def _read(path: str) -> str:
    return resources.files(__package__).joinpath('lua', path).read_text(
        encoding='utf-8')


@lru_cache(maxsize=None)
def assemble(name: str) -> Source:
    """Assemble command ``name`` with its includes (once per process).

    Raises:
        FileNotFoundError: no such command or include file.
        ValueError: an include cycle.
    """
    text: list[str] = []
    lines: list[tuple[str, int]] = []
    done: set[str] = set()

    def add(path: str, stack: tuple[str, ...]) -> None:
        if path in stack:
            raise ValueError(f'include cycle: {" -> ".join((*stack, path))}')
        if path in done:
            return
        done.add(path)
        base = path.rpartition('/')[0]
        for number, line in enumerate(_read(path).splitlines(), 1):
            m = _INCLUDE.match(line)
            if m:
                # in place: a command may run its common case before it
                # pulls in (and Lua defines) what only the rare cases need
                target = f'{base}/{m.group(1)}' if base else m.group(1)
                add(f'{target}.lua', (*stack, path))
            else:
                text.append(line)
                lines.append((path, number))

    add(f'{name}.lua', ())
    return Source(name, '\n'.join(text) + '\n', tuple(lines))


def explain(message: str, sources: dict[str, Source]) -> str:
    """Rewrite ``user_script:N`` in a Redis error to the file and line of
    the command that raised it (found by the script's SHA1 in the message,
    or the only source given)."""
    m = _LINE.search(message)
    if m is None:
        return message
    source = None
    sha = _SHA.search(message)
    if sha is not None:
        source = sources.get(sha.group(1))
    if source is None and len(sources) == 1:
        source = next(iter(sources.values()))
    if source is None:
        return message
    return _LINE.sub(lambda n: source.locate(int(n.group(1))), message)
