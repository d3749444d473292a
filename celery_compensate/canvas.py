"""``saga(...)``: a canvas of signatures, chains and groups run as a saga.

Chains (nested or not) become consecutive stages; a group is one parallel
stage; a chord is its header (a parallel stage) followed by its body.
"""
from __future__ import annotations

import datetime
import uuid
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, cast

from celery.canvas import Signature, _chain, chord, group, maybe_signature
from celery.utils.log import get_logger
from celery.utils.objects import getitem_property
from kombu.serialization import dumps as kombu_dumps
from kombu.utils.json import dumps

from . import signals
from .exceptions import InvalidSaga
from .appstate import get_state
from .model import (
    CHILD_TASK, TASK_OPTIONS, Plan, StepSpec, TaskRef, UndoSpec,
    validate_saga_id,
)
from .result import SagaResult

if TYPE_CHECKING:
    from celery import Celery

__all__ = ('saga', 'Saga')

logger = get_logger(__name__)

#: Signature options a saga sets itself or reads as task options.
_MANAGED = frozenset({
    'task_id', 'parent_id', 'root_id', 'group_id', 'group_index', 'chord',
    'chain', 'reply_to', 'subtask_type', 'immutable', *TASK_OPTIONS,
})
_REFUSED = frozenset({'link', 'link_error'})
#: Options that delay or expire a saga's start: its first stage's only, as
#: for a chain.
_FIRST_STAGE = ('countdown', 'eta', 'expires')

_NUMBER = (int, float)
#: Publishing options checked when the saga is built, so a bad value fails
#: at ``saga(...)`` instead of when its stage is published.
_OPTION_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    'headers': ((dict,), 'a dict'),
    'countdown': (_NUMBER, 'a number of seconds'),
    'expires': ((*_NUMBER, datetime.datetime), 'seconds or a datetime'),
    'eta': ((datetime.datetime,), 'a datetime'),
    'priority': ((int,), 'an integer 0-255'),
    'time_limit': (_NUMBER, 'a number of seconds'),
    'soft_time_limit': (_NUMBER, 'a number of seconds'),
    'queue': ((str,), 'a queue name'),
    'routing_key': ((str,), 'a string'),
    'exchange': ((str,), 'an exchange name'),
    'ignore_result': ((bool,), 'a bool'),
    'retry': ((bool,), 'a bool'),
    'retry_policy': ((dict,), 'a dict'),
}


def saga(*steps: Any, app: Celery | None = None, **options: Any) -> Saga:
    """Build a saga from signatures, chains and groups.

    Arguments:
        steps: the steps in order; a chain adds its links as consecutive
            steps, a group adds one parallel stage, a saga is one step of
            its own (a nested saga, compensated as a unit).
        app: the app (default: the app of the first signature, else the
            current app).
        options: publishing options of the saga, as for ``apply_async``.

    Raises:
        InvalidSaga: no steps, an unknown undo, a ``compensate_with`` of the
            wrong type, arguments that cannot be serialized, sagas nested
            deeper than ``compensate_max_depth``.
    """
    return Saga(*steps, app=app, **options)


@Signature.register_type(name='saga')
class Saga(Signature):
    """A saga: a :class:`~celery.canvas.Signature` (as ``chain`` and
    ``group`` are) that runs its steps with compensation.

    It is a dict like every signature (``{"task": "celery_compensate.saga",
    "kwargs": {"steps": [...]}, "subtask_type": "saga", ...}``), rebuilt by
    ``Signature.from_dict``, so it can travel in a message: as the ``link``
    of a task (it starts with the task's result as its first stage's first
    argument, like a chain), as a chord's body, or as a chain's last link.

    ``apply_async(args, kwargs, saga_id=None, **options)`` starts it;
    ``countdown``, ``eta`` and ``expires`` apply to its first stage, as for
    a chain; other publishing options to every step (a step's own options
    win).  ``saga | sig`` appends a step, ``sig | saga`` prepends one,
    ``saga | saga`` appends the right-hand saga as one step (a nested
    saga, with its own id ``<id>~<step>``: see
    :attr:`SagaResult.children`); ``clone``, ``s`` and ``si`` copy it with
    partial arguments for its first stage (``si``: it ignores a parent's
    result);
    ``freeze()`` fixes its id and returns its :class:`SagaResult`.
    """

    #: the task name in the signature dict (no such task is registered: a
    #: saga is started by ``apply_async``, in the process that holds it)
    TASK_NAME = 'celery_compensate.saga'

    steps = getitem_property('kwargs.steps', 'The steps, in order.')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None
                  ) -> Saga:
        """Rebuild a saga from its dict (``Signature.from_dict`` calls
        this for ``subtask_type`` ``saga``)."""
        kwargs = dict(d.get('kwargs') or {})
        steps = kwargs.pop('steps', ())     # dicts: __init__ rebuilds them
        made = cls(*steps, app=app, **dict(d.get('options') or {}))
        made['args'] = tuple(d.get('args') or ())
        made.kwargs.update(kwargs)              # partial kwargs (clone)
        made['immutable'] = bool(d.get('immutable'))
        return made

    def __init__(self, *steps: Any, app: Celery | None = None,
                 **options: Any) -> None:
        if len(steps) == 1 and isinstance(steps[0], (list, tuple)):
            steps = tuple(steps[0])
        if not steps:
            raise InvalidSaga('a saga needs at least one step')
        # a dict from a message is rebuilt; a signature is left as given
        steps = tuple(step if isinstance(step, Signature) or not isinstance(
            step, dict) else maybe_signature(step, app=app) for step in steps)
        app = app or _app_of(steps)
        super().__init__(self.TASK_NAME, (), {'steps': list(steps)},
                         options, subtask_type='saga', app=app)
        #: the app given (``app`` falls back to the current one)
        self.given_app = app
        self.stages = _stages(steps)
        if not self.stages:
            raise InvalidSaga('a saga needs at least one step')
        # validate now: bad input must fail before anything is stored (the
        # undos of the first stage's mutable steps are checked when the
        # saga starts: apply_async may still give those steps arguments)
        self._plan, self._specs = self.plan_for(final=False)

    @property
    def id(self) -> str | None:
        """The saga id, once :meth:`freeze` (or ``apply_async(saga_id=)``
        on a frozen copy) fixed it."""
        return self.options.get('saga_id')

    # a saga's handle is a SagaResult, which reads like an AsyncResult
    # without being one: the overrides differ in their return types
    def freeze(  # type: ignore[override]
            self, _id: str | None = None, **kwargs: Any) -> SagaResult:
        """Fix the saga id ``apply_async`` will use and return the saga's
        handle (``_id`` if given; other arguments of
        ``Signature.freeze`` are ignored)."""
        saga_id = _id or self.options.get('saga_id') or str(uuid.uuid4())
        try:
            saga_id = validate_saga_id(saga_id)
        except ValueError as exc:
            raise InvalidSaga(str(exc)) from None
        self.options['saga_id'] = saga_id
        return SagaResult(saga_id, app=self.app)

    def s(self, *args: Any, **kwargs: Any) -> Saga:
        """A copy with ``args`` and ``kwargs`` for its first stage."""
        return cast(Saga, self.clone(args, kwargs))

    def si(self, *args: Any, **kwargs: Any) -> Saga:
        """A copy that ignores a parent's result (as a link), with
        ``args`` and ``kwargs`` for its first stage."""
        copy = cast(Saga, self.clone(args, kwargs))
        copy['immutable'] = True
        return copy

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Saga):
            # the right-hand saga stays a unit: a nested saga
            return Saga(*self.steps, other, app=self.given_app,
                        **self.options)
        if isinstance(other, Signature):
            return Saga(*self.steps, other, app=self.given_app, **self.options)
        return NotImplemented

    def __ror__(self, other: Any) -> Any:
        if isinstance(other, Signature) and not isinstance(other, Saga):
            return Saga(other, *self.steps, app=self.given_app, **self.options)
        return NotImplemented

    def apply(  # type: ignore[override]
            self, args: Sequence[Any] | None = None,
            kwargs: Mapping[str, Any] | None = None,
            **options: Any) -> SagaResult:
        """Run the saga in this process, against its store: each step and
        undo in turn, as ``task_always_eager`` runs a saga started with
        :meth:`apply_async` (iteratively, however long the saga).  A test
        convenience, not a production mode: there is no worker, so no
        lease, retry delay or recovery applies.

        Returns:
            SagaResult: the saga's handle, final unless a step or undo
            was left waiting (a ``countdown`` is not waited for).
        """
        with get_state(self.app).coordinator.eagerly():
            return self.apply_async(args, kwargs, **options)

    def __repr__(self) -> str:
        return f'<Saga: {len(self.stages)} stages>'

    def plan_for(self, args: Sequence[Any] = (),
                 kwargs: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None,
                 final: bool = True) -> tuple[Plan, list[str]]:
        """Freeze the steps into a plan, checked and encoded for the store.

        Like ``chain.apply_async(args, kwargs)``, ``args`` are prepended to
        and ``kwargs`` merged into the first stage's mutable steps; the
        publishing ``options`` are defaults for every step, but
        ``countdown``, ``eta`` and ``expires`` for the first stage only.  ``final``:
        the first stage's arguments are complete, so its undos' calls are
        checked too.

        Returns:
            tuple: the plan, and each step's spec as stored (JSON).
        """
        built: list[list[tuple[Any, ...]]] = []
        index = 0
        every = dict(options or {})
        first = {key: every.pop(key) for key in _FIRST_STAGE if key in every}
        for k, stage in enumerate(self.stages):
            members = []
            for sig in stage:
                partial = k == 0 and not sig.immutable
                members.append(self._freeze(
                    sig, index, args if partial else (),
                    (kwargs or {}) if partial else {},
                    {**every, **first} if k == 0 else every))
                index += 1
            built.append(members)
        try:
            plan = Plan.from_stages(built)
        except ValueError as exc:
            raise InvalidSaga(str(exc)) from None
        limit = self._settings().max_depth
        if plan.depth > limit:
            raise InvalidSaga(
                f'the saga nests sagas {plan.depth} levels deep, more than '
                f'compensate_max_depth ({limit})')
        specs = []
        for step in plan.steps:
            if step.child is not None:
                specs.append(self._encode(step))
                continue
            self._check_serializable(step.call, step.describe())
            if step.undo is not None:
                self._check_serializable(step.undo,
                                         f'the undo of {step.describe()}')
                if final or not _gets_saga_args(step):
                    self._check_undo_call(step)
            specs.append(self._encode(step))
        return plan, specs

    @staticmethod
    def _encode(step: StepSpec) -> str:
        try:
            return dumps(step.to_dict())
        except (TypeError, ValueError) as exc:
            raise InvalidSaga(
                f'{step.describe()}: arguments or options cannot be '
                f'serialized as JSON (saga records are JSON): {exc}'
            ) from exc

    def _freeze(self, sig: Signature, index: int, extra: Sequence[Any],
                extra_kwargs: Mapping[str, Any], defaults: Mapping[str, Any]
                ) -> tuple[Any, ...]:
        if isinstance(sig, Saga):
            return self._freeze_child(sig, index, extra, extra_kwargs,
                                      defaults)
        name = sig.task
        where = f'step {index} ({name})'
        if not isinstance(name, str) or not name:
            raise InvalidSaga(f'{where}: a saga step needs a task name')
        refused = _REFUSED & set(sig.options)
        if refused:
            raise InvalidSaga(
                f'{where}: saga steps cannot carry {", ".join(sorted(refused))}'
                ' callbacks; compensation replaces them')
        task = self.app.tasks.get(name)
        opts = sig.options
        undo_value = (opts['compensate_with'] if 'compensate_with' in opts
                      else getattr(task, 'compensate_with', None))
        cof = bool(opts['compensate_on_failure'] if 'compensate_on_failure'
                   in opts else getattr(task, 'compensate_on_failure', False))
        pivot = opts['compensate_pivot'] if 'compensate_pivot' in opts \
            else getattr(task, 'compensate_pivot', False)
        if not isinstance(pivot, bool):
            raise InvalidSaga(f'{where}: compensate_pivot must be True or '
                              f'False, not {pivot!r}')
        call = TaskRef(
            name=name, args=(*extra, *sig.args),
            kwargs={**sig.kwargs, **extra_kwargs},
            options={**defaults, **{k: v for k, v in opts.items()
                                    if k not in _MANAGED}},
            immutable=bool(sig.immutable),
        )
        _check_options(call.options, where)
        undo = self._undo(undo_value, where)
        if cof and undo is None:
            raise InvalidSaga(
                f'{where}: compensate_on_failure=True needs compensate_with')
        timeout = self._timeout(opts, task, where)
        delay = _delay(call.options)
        undo_timeout = None
        if undo is not None:
            undo_sig = undo_value if isinstance(undo_value, Signature) else None
            undo_timeout = self._timeout(
                undo_sig.options if undo_sig is not None else {},
                self.app.tasks.get(undo.name), f'the undo of {where}')
        return call, undo, cof, timeout, undo_timeout, delay, pivot

    def _freeze_child(self, sig: Saga, index: int, extra: Sequence[Any],
                      extra_kwargs: Mapping[str, Any],
                      defaults: Mapping[str, Any]) -> tuple[Any, ...]:
        """A nested saga as step ``index``: its plan, and its call (the
        arguments its first stage gets, as ``apply_async(args, kwargs)``,
        after the previous stage's result unless it is immutable).  The
        parent's publishing options are defaults for its steps, its own
        options win."""
        where = f'step {index} (nested saga)'
        own = {k: v for k, v in sig.options.items() if k != 'saga_id'}
        refused = (_MANAGED | _REFUSED) & set(own)
        if refused:
            raise InvalidSaga(
                f'{where}: a nested saga cannot carry '
                f'{", ".join(sorted(refused))}')
        if sig.options.get('saga_id'):
            raise InvalidSaga(
                f'{where}: a nested saga gets its id from its parent '
                f'(<parent id>~{index}); do not freeze it with an id')
        # the parent's countdown, eta or expires are its first stage's;
        # the child's own apply to the child's first stage
        options = {**{k: v for k, v in defaults.items()
                      if k not in _FIRST_STAGE}, **own}
        try:
            plan, _ = sig.plan_for((), {}, options, final=False)
        except InvalidSaga as exc:
            raise InvalidSaga(f'{where}: {exc}') from None
        call = TaskRef(
            name=CHILD_TASK, args=(*extra, *sig.args),
            kwargs={**{k: v for k, v in sig.kwargs.items() if k != 'steps'},
                    **extra_kwargs},
            immutable=bool(sig.immutable))
        return call, None, False, None, None, 0.0, False, plan

    def _timeout(self, opts: Mapping[str, Any], task: Any,
                 where: str) -> float | None:
        """The ``compensate_timeout`` of a signature or its task."""
        value = (opts['compensate_timeout'] if 'compensate_timeout' in opts
                 else getattr(task, 'compensate_timeout', None))
        if value is None:
            return None
        minimum = self._settings().min_lease
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or value < minimum):
            raise InvalidSaga(
                f'{where}: compensate_timeout must be a number of seconds of '
                f'at least {minimum:g} (2 x compensate_heartbeat_interval + '
                f'2 x compensate_recovery_interval), got {value!r}')
        return float(value)

    def _settings(self) -> Any:
        return get_state(self.app).settings

    def _undo(self, value: Any, where: str) -> UndoSpec | None:
        if value is None:
            return None
        if isinstance(value, Signature):
            if isinstance(value, (_chain, group, chord)):
                raise InvalidSaga(f'{where}: compensate_with must be a single '
                                  f'task signature, got {type(value).__name__}')
            name = value.task
        elif isinstance(value, str):
            name = value
        elif isinstance(getattr(value, 'name', None), str) and callable(
                getattr(value, 'apply_async', None)):
            name = value.name
        else:
            raise InvalidSaga(
                f'{where}: compensate_with must be a task, a task name or a '
                f'signature, got {type(value).__name__} {value!r}')
        # (a signature may name no task)
        if name is None or name not in self.app.tasks:
            raise InvalidSaga(
                f'{where}: undo task {name!r} is not a registered task')
        if name.startswith('celery.'):
            raise InvalidSaga(
                f'{where}: undo task {name!r} is one of Celery\'s own tasks')
        if isinstance(value, Signature):
            spec = UndoSpec(
                name=name, args=tuple(value.args), kwargs=dict(value.kwargs),
                options={k: v for k, v in value.options.items()
                         if k not in _MANAGED | _REFUSED},
                immutable=bool(value.immutable))
        else:
            spec = UndoSpec(name=name)
        _check_options(spec.options, f'the undo of {where} ({name})')
        return spec

    def _check_undo_call(self, step: StepSpec) -> None:
        """The undo must accept the call it will get, checked as Celery
        checks it at publish (``Task.typing``), so a mismatch fails here and
        not when the undo is needed.

        Raises:
            InvalidSaga: naming the undo, the step and the call.
        """
        assert step.undo is not None
        task = self.app.tasks[step.undo.name]
        check = getattr(task, '__header__', None)
        if check is None or not getattr(task, 'typing', True):
            return
        # the result, and a previous stage's result, are not known yet
        args, kwargs = step.undo.call_args(None, *step.called_with([None]))
        try:
            check(*args, **kwargs)
        except TypeError as exc:
            shape = ('its own arguments only (.si)' if step.undo.immutable
                     else '(result, *args, **kwargs): the step\'s result, '
                          'then the step\'s own arguments and keyword '
                          'arguments, then its own')
            raise InvalidSaga(
                f'{step.describe()}: its undo {task.name!r} cannot take the '
                f'call it gets, {task.name}('
                f'{_call_repr(args, kwargs, not step.undo.immutable)}), '
                f'which is {shape}: {exc}') from None

    def _check_serializable(self, ref: TaskRef, where: str) -> None:
        """The task's own serializer must encode the arguments too (JSON
        is checked by encoding the spec)."""
        task = self.app.tasks.get(ref.name)
        serializer = (ref.options.get('serializer')
                      or getattr(task, 'serializer', None)
                      or self.app.conf.task_serializer)
        if serializer == 'json':
            return
        try:
            kombu_dumps((list(ref.args), dict(ref.kwargs), {}),
                        serializer=serializer)
        except Exception as exc:  # noqa: BLE001 - any encoder error
            raise InvalidSaga(
                f'{where}: arguments cannot be serialized with the task\'s '
                f'serializer {serializer!r}: {exc}') from exc

    def apply_async(  # type: ignore[override]
            self, args: Sequence[Any] | None = None,
            kwargs: Mapping[str, Any] | None = None,
            saga_id: str | None = None, **options: Any) -> SagaResult:
        """Store the saga, then publish its first stage.

        Arguments:
            args: prepended to the first stage's arguments (as for a chain;
                ignored by an immutable saga, ``si()``).
            kwargs: merged into the first stage's keyword arguments.
            saga_id: choose the saga id (default: the frozen one, else a
                new UUID).
            options: publishing options: ``countdown``, ``eta`` and
                ``expires`` for the first stage (as for a chain), the others
                (``queue``, ``priority`` ...) for every step; a step's own
                options win.  ``parent_id`` and ``root_id`` (sent by Celery
                when the saga is a link) are ignored.

        Returns:
            SagaResult: the saga's handle.
        Raises:
            InvalidSaga: the saga cannot be started as given.
            SagaStoreUnavailable: Redis is unreachable; nothing was
                published.
        """
        state = get_state(self.app)
        state.check_conf()
        options = {**self.options, **options}
        saga_id = saga_id or options.pop('saga_id', None)
        options.pop('saga_id', None)
        for ignored in ('parent_id', 'root_id'):
            options.pop(ignored, None)
        if options.get('chain'):
            raise InvalidSaga('a saga can only be the last link of a chain')
        options.pop('chain', None)
        refused = (_MANAGED | _REFUSED) & set(options)
        if refused:
            raise InvalidSaga(
                f'saga options {", ".join(sorted(refused))} are set by the '
                'saga itself or not supported')
        try:
            saga_id = validate_saga_id(saga_id) if saga_id else str(uuid.uuid4())
        except ValueError as exc:
            raise InvalidSaga(str(exc)) from None
        args = tuple(self.args) if self.immutable else (
            *(args or ()), *self.args)
        kwargs = {**{k: v for k, v in self.kwargs.items() if k != 'steps'},
                  **(kwargs or {})}
        if args or kwargs or options:
            plan, specs = self.plan_for(args, kwargs, options)
        else:
            plan, specs = self._plan, self._specs
            for step in plan.stages[0]:
                if step.undo is not None and _gets_saga_args(step):
                    self._check_undo_call(step)
        trace_parent = (state.tracing.started(saga_id) if state.tracing
                        else None)
        if not state.store.create(saga_id, plan, specs, trace_parent):
            raise InvalidSaga(f'saga {saga_id!r} already exists')
        if state.tracing:
            # only now: a start refused for a taken id must not put the
            # other saga's tasks in this caller's trace
            state.tracing.created(saga_id, trace_parent)
        # the saga exists from here on: its start is announced before its
        # first stage is published, so that a publishing error (raised to
        # the caller, and compensated like a failed step) follows its
        # RUNNING line and its saga_started signal
        logger.info('saga %s: RUNNING: started with %d steps in %d stages',
                    saga_id, len(plan), len(plan.stages))
        signals.saga_started.send(sender=self.app, saga_id=saga_id,
                                  steps=len(plan))
        state.coordinator.publish_stage(saga_id, plan.stages[0], first=True)
        return SagaResult(saga_id, app=self.app)

    def delay(  # type: ignore[override]
            self, *args: Any, **kwargs: Any) -> SagaResult:
        """Shortcut for ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)


def _gets_saga_args(step: StepSpec) -> bool:
    """Whether ``apply_async(args, kwargs)`` adds to the step's call."""
    return step.stage == 0 and not step.call.immutable


def _call_repr(args: Sequence[Any], kwargs: Mapping[str, Any],
               result_first: bool) -> str:
    """``<result>, 'a', 40, currency='EUR'`` for an error message."""
    shown = ['<result>' if n == 0 and result_first else repr(value)
             for n, value in enumerate(args)]
    shown += [f'{k}={v!r}' for k, v in kwargs.items()]
    return ', '.join(shown)


def _delay(options: Mapping[str, Any]) -> float:
    """Seconds a step waits in its queue by design (countdown or eta)."""
    delay = float(options.get('countdown') or 0)
    eta = options.get('eta')
    if isinstance(eta, datetime.datetime):
        now = datetime.datetime.now(eta.tzinfo)
        delay = max(delay, (eta - now).total_seconds())
    return max(0.0, delay)


def _check_options(options: Mapping[str, Any], where: str) -> None:
    for key, value in options.items():
        expected = _OPTION_TYPES.get(key)
        if expected is None or value is None:
            continue
        types, text = expected
        ok = isinstance(value, types) and not (
            isinstance(value, bool) and bool not in types)
        if ok and key == 'priority':
            ok = 0 <= value <= 255
        if not ok:
            raise InvalidSaga(f'{where}: option {key}={value!r} must be {text}')


def _app_of(steps: Iterable[Any]) -> Celery | None:
    for step in steps:
        app: Celery | None = getattr(step, '_app', None)
        if app is not None:
            return app
    return None


def _stages(steps: Iterable[Any]) -> list[list[Signature]]:
    stages: list[list[Signature]] = []
    for step in steps:
        stages.extend(_flatten(step))
    return stages


def _flatten(sig: Any) -> list[list[Signature]]:
    if isinstance(sig, Saga):
        # a nested saga: one step (or parallel member) of its parent
        return [[sig]]
    if isinstance(sig, _chain):
        return _stages(sig.tasks)
    if isinstance(sig, chord):
        return _flatten(group(list(sig.tasks))) + _flatten(sig.body)
    if isinstance(sig, group):
        members: list[Signature] = []
        for task in sig.tasks:
            sub = _flatten(task)
            if len(sub) != 1:
                raise InvalidSaga(
                    f'a group member must be a single task or a group, got '
                    f'{task!r}: chains inside parallel stages are not '
                    'supported; split them into stages')
            members.extend(sub[0])
        if not members:
            raise InvalidSaga('a group in a saga needs at least one task')
        return [members]
    if isinstance(sig, Signature):
        return [[sig]]
    raise InvalidSaga(
        f'saga steps must be Celery signatures, chains or groups, got '
        f'{type(sig).__name__} {sig!r}')
