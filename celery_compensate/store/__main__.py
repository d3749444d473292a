"""Developer tools for the store's Lua commands.

``python -m celery_compensate.store lint [luacheck options]`` runs luacheck
on every command as Redis receives it (assembled with its includes), so an
unused helper or variable is caught, and reports each warning at the file
and line it comes from.  ``python -m celery_compensate.store show NAME``
prints an assembled command.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .scripts import COMMANDS, assemble

#: luacheck's configuration: the globals Redis gives a script.
CONFIG = Path(__file__).with_name('.luacheckrc')

_WARNING = re.compile(r'^(\S+?\.lua):(\d+):(\d+)')


def lint(options: list[str]) -> int:
    """Run luacheck on every assembled command; its exit code."""
    luacheck = shutil.which('luacheck')
    if luacheck is None:
        print('luacheck is not installed (Debian: apt-get install lua-check)',
              file=sys.stderr)
        return 2
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in COMMANDS:
            source = assemble(name)
            path = Path(tmp) / f'{name}.lua'
            path.write_text(source.text, encoding='utf-8')
            proc = subprocess.run(
                [luacheck, '--config', str(CONFIG), '--formatter', 'plain',
                 '--codes', *options, str(path)],
                capture_output=True, text=True, check=False)
            for line in (proc.stdout + proc.stderr).splitlines():
                m = _WARNING.match(line)
                if m:
                    origin, number = source.lines[int(m.group(2)) - 1]
                    line = (f'celery_compensate/store/lua/{origin}:{number}:'
                            f'{m.group(3)}{line[m.end():]} [in {name}]')
                print(line)
            status = max(status, proc.returncode)
    print(f'luacheck: {len(COMMANDS)} commands checked, '
          f'{"no warnings" if status == 0 else "see above"}')
    return status


def main(argv: list[str]) -> int:
    if argv[:1] == ['lint']:
        return lint(argv[1:])
    if argv[:1] == ['show'] and len(argv) == 2 and argv[1] in COMMANDS:
        sys.stdout.write(assemble(argv[1]).text)
        return 0
    print(f'usage: python -m celery_compensate.store lint [luacheck options]'
          f' | show {{{",".join(COMMANDS)}}}', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
