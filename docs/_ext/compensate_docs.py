"""Sphinx helpers for the celery-compensate docs (no MyST needed).

- At ``config-inited`` the settings table is generated from the
  declarations in ``celery_compensate/settings.py``
  (:func:`celery_compensate.settings.settings_table`, the Markdown table
  of docs/settings.md), converted to a ``list-table`` and written to
  ``docs/_generated/settings-table.inc``, which ``reference.rst``
  includes; the file is rewritten only when it changes.
- The ``markdown-include`` directive converts one of the repository's
  Markdown files (``docs/state-machine.md``, ``BENCHMARKS.md``) to
  reStructuredText (:mod:`mdrst`) when the page is read, so those files
  stay the single source (tests parse ``docs/state-machine.md``) and the
  HTML shows them as real sections and tables.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList

from mdrst import markdown_to_rst, table

GENERATED = '_generated'
SETTINGS_TABLE = 'settings-table.inc'


def settings_table_rst() -> str:
    """The settings table of the reference page, as reStructuredText."""
    from celery_compensate.settings import settings_table

    return '\n'.join(table(settings_table().splitlines())) + '\n'


# -- Sphinx -----------------------------------------------------------------

class MarkdownInclude(Directive):
    """``.. markdown-include:: ../BENCHMARKS.md``.

    Options: ``:heading-offset:``, the depth of the file's top heading as
    an index into :data:`ADORNMENTS` plus one (1: ``=``, 2: ``-``, 3:
    ``~``; the pages have an overlined title and ``-`` sections, so 3
    nests the file under a section), default 1; ``:skip-title:``, leave
    out the file's first ``#`` heading.
    """

    required_arguments = 1
    option_spec = {'heading-offset': directives.nonnegative_int,
                   'skip-title': directives.flag}
    has_content = False

    def run(self) -> list[Any]:
        env = self.state.document.settings.env
        rel, path = env.relfn2path(self.arguments[0])
        env.note_dependency(rel)
        text = Path(path).read_text(encoding='utf-8')
        if 'skip-title' in self.options:
            text = re.sub(r'\A\s*#\s[^\n]*\n', '', text, count=1)
        rst = markdown_to_rst(text, self.options.get('heading-offset', 1))
        self.state_machine.insert_input(StringList(rst, source=path), path)
        return []


def write_settings_table(app: Any, config: Any) -> None:
    target = Path(app.srcdir) / GENERATED / SETTINGS_TABLE
    text = settings_table_rst()
    target.parent.mkdir(exist_ok=True)
    if not target.is_file() or target.read_text(encoding='utf-8') != text:
        target.write_text(text, encoding='utf-8')


def setup(app: Any) -> dict[str, Any]:
    app.add_directive('markdown-include', MarkdownInclude)
    app.connect('config-inited', write_settings_table)
    return {'version': '1', 'parallel_read_safe': True,
            'parallel_write_safe': True}
