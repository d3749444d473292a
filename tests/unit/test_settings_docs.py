"""The settings tables of docs/settings.md and of the Sphinx docs'
Reference page are the ones the declarations in
celery_compensate/settings.py generate."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from celery_compensate.settings import (
    DEFAULTS, TABLE_END, TABLE_START, Settings, settings_table,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / 'docs'


@pytest.mark.parametrize('doc', ['docs/settings.md'])
def test_the_settings_table_is_generated_from_the_declarations(doc):
    text = (ROOT / doc).read_text(encoding='utf-8')
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1, (
        f'{doc} must hold the settings table once, between {TABLE_START} '
        f'and {TABLE_END}')
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    assert table.strip() == settings_table().strip(), (
        f"{doc}'s settings table differs from the declarations in "
        'celery_compensate/settings.py: regenerate it with '
        '`.venv/bin/python -m celery_compensate.settings` and paste the '
        f'output between {TABLE_START} and {TABLE_END} in {doc}')


def test_every_setting_is_declared_with_a_key_and_a_doc():
    options = Settings.options()
    assert [o.key for o in options] == list(DEFAULTS)
    assert len({o.name for o in options}) == len(options)
    for option in options:
        assert option.key == f'compensate_{option.name}'
        assert option.doc and '\n' not in option.doc
        assert getattr(Settings, option.name) is option


def test_python_m_prints_the_table():
    out = subprocess.run(
        [sys.executable, '-m', 'celery_compensate.settings'], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout
    assert out == settings_table()


@pytest.fixture
def mdrst(monkeypatch):
    """docs/_ext/mdrst.py, the converter the docs build uses (pure Python)."""
    monkeypatch.syspath_prepend(str(DOCS / '_ext'))
    import mdrst
    return mdrst


def test_the_reference_page_includes_the_table_the_build_generates():
    """reference.rst includes the file docs/conf.py's extension writes at
    build time, and nothing else holds a copy that could go stale."""
    page = (DOCS / 'reference.rst').read_text(encoding='utf-8')
    assert page.count('.. include:: _generated/settings-table.inc') == 1
    conf = (DOCS / 'conf.py').read_text(encoding='utf-8')
    assert "'compensate_docs'" in conf
    ext = (DOCS / '_ext' / 'compensate_docs.py').read_text(encoding='utf-8')
    assert "app.connect('config-inited', write_settings_table)" in ext
    assert not (ROOT / 'README.md').read_text(encoding='utf-8').count(
        TABLE_START), 'the README links to the docs instead of a copy'


def _markdown_text(cell: str) -> str:
    """What a reader sees of a Markdown cell: no backticks, ``\\|`` a bar."""
    return re.sub(r'`([^`]*)`', r'\1', cell).replace('\\|', '|')


def test_the_generated_table_shows_every_setting_as_declared(mdrst):
    """The reStructuredText table, parsed by docutils as Sphinx does,
    holds one row per setting with the declared key, default and meaning."""
    docutils_core = pytest.importorskip('docutils.core')
    rst = '\n'.join(mdrst.table(settings_table().splitlines()))
    tree = docutils_core.publish_doctree(
        rst, settings_overrides={'report_level': 2, 'halt_level': 2})
    rows = [[entry.astext().strip() for entry in row.children]
            for row in tree.findall(
                lambda n: n.tagname == 'row')]
    options = Settings.options()
    assert rows[0] == ['Setting', 'Default', 'Meaning']
    assert len(rows) == 1 + len(options)
    for row, option in zip(rows[1:], options, strict=True):
        assert row == [option.key, _markdown_text(option.shown_default),
                       _markdown_text(option.doc)], option.key
