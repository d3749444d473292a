"""The settings tables of the README and docs/settings.md are the ones the
declarations in celery_compensate/settings.py generate."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from celery_compensate.settings import (
    DEFAULTS, TABLE_END, TABLE_START, Settings, settings_table,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('doc', ['README.md', 'docs/settings.md'])
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
