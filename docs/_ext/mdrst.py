"""Markdown to reStructuredText, for the Markdown files of this
repository that the docs show (``docs/state-machine.md``,
``BENCHMARKS.md``, the settings table): pure Python, no docutils.

It handles the Markdown these files use: ATX headings, paragraphs,
``-``/``*`` bullet lists (nested, with continuation lines), pipe tables
(``\\|`` is a literal bar; a row may have fewer cells than the header),
fenced code, inline code, bold, italics and links. Every ASCII punctuation
character of plain text is backslash-escaped and inline markup is wrapped
in escaped spaces, so no sentence of the Markdown can be read as
reStructuredText markup; what the converter does not know it shows as
plain text.
"""
from __future__ import annotations

import re
import string

#: heading adornments by depth (1 is ``=``); the pages' titles are
#: overlined, a style of their own, and their sections use ``-``
ADORNMENTS = '=-~^"\''

_PUNCTUATION = frozenset(string.punctuation)


# -- inline -----------------------------------------------------------------

def escape(text: str) -> str:
    """Plain text with every ASCII punctuation character escaped."""
    return ''.join('\\' + c if c in _PUNCTUATION else c for c in text)


def _wrap(markup: str) -> str:
    # escaped spaces around inline markup: recognised whatever touches it,
    # and nothing shows in the output
    return '\\ ' + markup + '\\ '


def _literal(code: str) -> str:
    # inline markup may not start or end with whitespace: a code span's
    # outer spaces are dropped
    code = code.replace('\n', ' ').strip()
    if not code:
        return ''
    if '`' not in code and '\\' not in code:
        return _wrap(f'``{code}``')
    return _wrap(f':literal:`{escape(code)}`')


_INLINE = re.compile(
    r'(?P<code>(?P<ticks>`+)(?P<codetext>.+?)(?P=ticks))'
    r'|\*\*(?P<strong>\S(?:.*?\S)?)\*\*'
    r'|(?<![\w*])\*(?P<em>[^\s*](?:[^*]*?[^\s*])?)\*(?![\w*])'
    r'|\[(?P<linktext>[^\]]+)\]\((?P<url>[^)\s]+)\)'
    r'|\\(?P<escaped>[!-/:-@\[-`{-~])')


def _plain(text: str) -> str:
    """Inline Markdown without its markup, escaped (for inside bold)."""
    out = []
    for piece in re.split(r'(`+)', text):
        if not piece.startswith('`'):
            out.append(piece)
    return escape(re.sub(r'\\([!-/:-@\[-`{-~])', r'\1', ''.join(out)))


def inline(text: str) -> str:
    """Inline Markdown as reStructuredText."""
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(escape(text[pos:m.start()]))
        pos = m.end()
        if m['code']:
            body = m['codetext']
            if len(m['ticks']) > 1 and body.startswith(' ') and body.endswith(' '):
                body = body[1:-1]
            out.append(_literal(body))
        elif m['strong'] is not None:
            out.append(_wrap(f'**{_plain(m["strong"])}**'))
        elif m['em'] is not None:
            out.append(_wrap(f'*{_plain(m["em"])}*'))
        elif m['linktext'] is not None:
            url = m['url']
            label = _plain(m['linktext'])
            if re.match(r'https?://', url):
                out.append(_wrap(f'`{label} <{url}>`__'))
            else:           # an anchor or a file of the repository
                out.append(inline(m['linktext']))
        else:
            out.append(escape(m['escaped']))
    out.append(escape(text[pos:]))
    return ''.join(out)


# -- blocks -----------------------------------------------------------------

_HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
_BULLET = re.compile(r'^(\s*)([-*+])\s+(.*)$')
_FENCE = re.compile(r'^(\s*)(```+|~~~+)\s*([\w+-]*)')


def split_row(line: str) -> list[str]:
    """The cells of one Markdown table row (``\\|`` is a literal bar)."""
    body = line.strip()
    if body.startswith('|'):
        body = body[1:]
    if body.endswith('|') and not body.endswith('\\|'):
        body = body[:-1]
    return [cell.strip() for cell in re.split(r'(?<!\\)\|', body)]


def _is_separator(cells: list[str]) -> bool:
    return all(re.fullmatch(r':?-+:?', c) for c in cells)


def table(lines: list[str]) -> list[str]:
    rows = [split_row(line) for line in lines]
    header = rows[0]
    body = [r for r in rows[1:] if not _is_separator(r)]
    width = max(len(r) for r in [header] + body)
    out = ['.. list-table::', '   :header-rows: 1', '   :class: md-table', '']
    for row in [header] + body:
        row = row + [''] * (width - len(row))
        for n, cell in enumerate(row):
            text = inline(cell) if cell else '\\ '
            out.append(f'   {"*" if n == 0 else " "} - {text}')
    out.append('')
    return out


class _Headings:
    """Markdown heading levels to section depths with no level skipped."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.stack: list[int] = []

    def depth(self, level: int) -> int:
        while self.stack and self.stack[-1] >= level:
            self.stack.pop()
        self.stack.append(level)
        return self.offset + len(self.stack) - 1


def blocks(lines: list[str], headings: _Headings | None) -> list[str]:
    """Block-level Markdown as reStructuredText lines."""
    out: list[str] = []
    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        if not line.strip() or re.match(r'^\s*<!--.*-->\s*$', line):
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading and headings is not None:
            depth = headings.depth(len(heading[1]))
            title = inline(heading[2])
            mark = ADORNMENTS[min(depth, len(ADORNMENTS)) - 1]
            out += [title, mark * max(len(title), 4), '']
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            mark = fence[2]
            i += 1
            code = []
            while i < n and not lines[i].strip().startswith(mark):
                code.append(lines[i])
                i += 1
            i += 1
            out += ['.. code-block:: text', '']
            out += ['   ' + c if c.strip() else '' for c in code] + ['']
            continue
        if line.lstrip().startswith('|'):
            rows = []
            while i < n and lines[i].lstrip().startswith('|'):
                rows.append(lines[i])
                i += 1
            out += table(rows)
            continue
        bullet = _BULLET.match(line)
        if bullet:
            while i < n:
                m = _BULLET.match(lines[i])
                if not m:
                    break
                indent = len(m[1]) + len(m[2]) + 1
                item = [m[3]]
                i += 1
                while i < n:
                    nxt = lines[i]
                    if not nxt.strip():
                        # a blank line ends the item unless indented text
                        # follows it
                        if (i + 1 < n and lines[i + 1].strip() and
                                len(lines[i + 1]) - len(lines[i + 1].lstrip())
                                >= indent):
                            item.append('')
                            i += 1
                            continue
                        break
                    lead = len(nxt) - len(nxt.lstrip())
                    if lead < indent and (_BULLET.match(nxt) or lead == 0
                                          and (_HEADING.match(nxt)
                                               or nxt.startswith('|'))):
                        break
                    item.append(nxt[min(lead, indent):])
                    i += 1
                body = blocks(item, None)
                out.append('- ' + (body[0] if body else '\\ '))
                out += ['  ' + b if b else '' for b in body[1:]]
                out.append('')
                while i < n and not lines[i].strip():
                    i += 1
            continue
        para = [line.strip()]
        i += 1
        while i < n and lines[i].strip() and not (
                _HEADING.match(lines[i]) or _FENCE.match(lines[i])
                or _BULLET.match(lines[i]) or lines[i].lstrip().startswith('|')):
            para.append(lines[i].strip())
            i += 1
        out += [inline(' '.join(para)), '']
    return out


def markdown_to_rst(text: str, offset: int = 1) -> list[str]:
    """A Markdown document as reStructuredText lines; its top heading at
    section depth ``offset`` (1: the level under the page title)."""
    return blocks(text.splitlines(), _Headings(offset))
