"""Sphinx configuration of the celery-compensate docs (`make docs`).

Built with warnings as errors (``sphinx-build -W --keep-going``) and
without network: the intersphinx inventories of Celery and Python are
shipped in ``docs/_intersphinx``.
"""
from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# autodoc imports the package of this tree, not an installed copy
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / '_ext'))

import celery_compensate  # noqa: E402

project = 'celery-compensate'
author = 'the celery-compensate authors'
copyright = 'the celery-compensate authors, BSD-3-Clause'
release = celery_compensate.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.intersphinx',
    'compensate_docs',          # docs/_ext: settings table, Markdown pages
]

root_doc = 'index'
source_suffix = {'.rst': 'restructuredtext'}
# docs/settings.md and docs/state-machine.md stay Markdown (tests read
# them); the pages include them through `markdown-include`
exclude_patterns = ['_build', '_generated', '_intersphinx', '_ext',
                    '*.md']
templates_path: list[str] = []

# -- autodoc / napoleon ------------------------------------------------------

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_default_options = {'show-inheritance': True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- intersphinx ---------------------------------------------------------------
#
# The inventories are files of this repository, so a build needs no
# network. They come from Debian's python-celery-doc (Celery 5.2.6) and
# python3.11-doc packages: the object paths are those of the sites
# below. To refresh them where the network allows:
#   curl -fsSLo docs/_intersphinx/celery.inv https://docs.celeryq.dev/en/stable/objects.inv
#   curl -fsSLo docs/_intersphinx/python.inv https://docs.python.org/3/objects.inv
intersphinx_mapping = {
    'celery': ('https://docs.celeryq.dev/en/stable/',
               str(DOCS / '_intersphinx' / 'celery.inv')),
    'python': ('https://docs.python.org/3/',
               str(DOCS / '_intersphinx' / 'python.inv')),
}
intersphinx_timeout = 5

# -- HTML ----------------------------------------------------------------------

html_theme = 'alabaster'
html_title = f'celery-compensate {release}'
html_theme_options = {
    'description': 'Compensation (sagas) for Celery task chains',
    'page_width': '1180px',
    'sidebar_width': '230px',
    'fixed_sidebar': True,
}
html_static_path: list[str] = []
html_show_sourcelink = False
