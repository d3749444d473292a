"""The saga model: plans, states and identifiers.

Pure data and rules, with no Redis or Celery imports, so that everything
else (the canvas that builds plans, the store that persists them, the
worker hooks that advance them) shares one vocabulary.

A saga is a list of *stages* run one after another; a stage is one step or
several parallel steps (a Celery group).  Steps are numbered globally in
plan order.  Compensation walks the stages backwards: the undos of one
stage run in parallel, and the stage before it starts only once every
member of the later stage has settled (finished forward and been undone).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence, TypeVar

__all__ = (
    'SagaState', 'StepState', 'UndoState', 'UndoSpec', 'StepSpec', 'Plan',
    'TaskRef', 'FINAL_STATES', 'step_task_id', 'undo_task_id',
    'parse_task_id', 'idempotency_key', 'undo_delay', 'validate_saga_id',
    'TASK_OPTIONS', 'OPERATOR_STATES', 'child_saga_id', 'parent_of',
    'nesting_depth', 'CHILD_TASK',
)

#: The task name of a nested saga's step in its parent's plan (no such task
#: is registered or published: the parent's coordinator starts the child
#: saga in its place).
CHILD_TASK = 'celery_compensate.saga'

#: The task options this library reads (``@app.task(compensate_with=...)``).
TASK_OPTIONS = ('compensate_with', 'compensate_on_failure',
                'compensate_timeout', 'compensate_pivot')


class SagaState(str, enum.Enum):
    """Lifecycle of a saga as stored in Redis."""

    RUNNING = 'RUNNING'
    COMPLETED = 'COMPLETED'
    COMPENSATING = 'COMPENSATING'
    COMPENSATED = 'COMPENSATED'
    COMPENSATION_FAILED = 'COMPENSATION_FAILED'
    #: past its pivot, a step spent its forward-recovery budget: it waits
    #: for an operator's retry (nothing is undone past a pivot)
    FORWARD_FAILED = 'FORWARD_FAILED'

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


#: States `SagaResult.wait` returns on.  ``COMPENSATION_FAILED`` and
#: ``FORWARD_FAILED`` are final for waiting (nothing more happens by
#: itself) but are kept in Redis without expiry so an operator can repair
#: them.
FINAL_STATES = frozenset({
    SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.COMPENSATION_FAILED,
    SagaState.FORWARD_FAILED,
})

#: States that wait for an operator (``retry``).
OPERATOR_STATES = frozenset({
    SagaState.COMPENSATION_FAILED, SagaState.FORWARD_FAILED,
})


class StepState(str, enum.Enum):
    """Forward state of one step (one-letter codes as stored)."""

    PENDING = 'P'      #: its stage was never dispatched
    RUNNING = 'R'      #: dispatched, not yet settled
    DONE = 'D'         #: completed and recorded
    FAILED = 'F'       #: failed, revoked, rejected or lost


class UndoState(str, enum.Enum):
    """State of one step's undo (one-letter codes as stored)."""

    NONE = ''          #: not (yet) due
    QUEUED = 'Q'       #: dispatched, not yet started
    RUNNING = 'R'      #: an attempt is running
    WAITING = 'W'      #: an attempt failed, the next one is scheduled
    DONE = 'D'         #: undone
    FAILED = 'F'       #: retry budget spent; waits for an operator


_Ref = TypeVar('_Ref', bound='TaskRef')


@dataclass(frozen=True)
class TaskRef:
    """A task call frozen into a plan: name, arguments and options."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    immutable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            'task': self.name, 'args': list(self.args),
            'kwargs': dict(self.kwargs), 'options': dict(self.options),
            'immutable': self.immutable,
        }

    @classmethod
    def from_dict(cls: type[_Ref], d: Mapping[str, Any]) -> _Ref:
        return cls(
            name=d['task'], args=tuple(d.get('args') or ()),
            kwargs=dict(d.get('kwargs') or {}),
            options=dict(d.get('options') or {}),
            immutable=bool(d.get('immutable')),
        )


@dataclass(frozen=True)
class UndoSpec(TaskRef):
    """The undo of a step.

    A mutable undo is called as ``undo(result, *step_args, *own_args,
    **step_kwargs, **own_kwargs)``, exactly as Celery passes a parent's
    result to a chained task; an immutable one (``.si()``) with its own
    arguments only.
    """

    def call_args(
        self, result: Any, step_args: Sequence[Any],
        step_kwargs: Mapping[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Return the ``(args, kwargs)`` the undo is called with.

        Arguments:
            result: the forward step's return value (``None`` when the
                step failed and opted in to ``compensate_on_failure``).
            step_args: the positional arguments the step was called with.
            step_kwargs: the keyword arguments the step was called with.
        """
        if self.immutable:
            return tuple(self.args), dict(self.kwargs)
        return ((result, *step_args, *self.args),
                {**step_kwargs, **self.kwargs})


@dataclass(frozen=True)
class StepSpec:
    """One forward step of a plan."""

    index: int
    stage: int
    call: TaskRef
    undo: UndoSpec | None = None
    compensate_on_failure: bool = False
    #: its lease: seconds the step may go without a live worker renewing
    #: it before it is recovered (``compensate_timeout``); ``None``: the
    #: app's ``compensate_step_timeout``
    timeout: float | None = None
    #: the same for its undo
    undo_timeout: float | None = None
    #: seconds it waits in the broker by design (countdown, eta), added to
    #: the time it may wait there
    delay: float = 0.0
    #: the saga's point of no return (``compensate_pivot``): once it
    #: completed, the steps after it are retried, never compensated
    pivot: bool = False
    #: a nested saga: the plan of the child saga this step runs (``call``
    #: then carries the arguments for its first stage)
    child: Plan | None = None

    @property
    def undo_flag(self) -> str:
        """Code stored for the Lua scripts: 0 no undo, 1 undo, 2 undo also
        on the step's own failure.

        A nested saga is ``2``: its "undo" is its own compensation, which
        runs both when it completed (undone as a unit) and when it failed
        (it compensated itself; the parent waits until it has, and an
        operator's retry of the parent re-drives it)."""
        if self.child is not None:
            return '2'
        if self.undo is None:
            return '0'
        return '2' if self.compensate_on_failure else '1'

    def to_dict(self) -> dict[str, Any]:
        return {
            'index': self.index, 'stage': self.stage,
            'call': self.call.to_dict(),
            'undo': self.undo.to_dict() if self.undo else None,
            'compensate_on_failure': self.compensate_on_failure,
            'timeout': self.timeout, 'undo_timeout': self.undo_timeout,
            'delay': self.delay, 'pivot': self.pivot,
            **({'child': self.child.to_list()} if self.child else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepSpec:
        undo = d.get('undo')
        return cls(
            index=int(d['index']), stage=int(d['stage']),
            call=TaskRef.from_dict(d['call']),
            undo=UndoSpec.from_dict(undo) if undo else None,
            compensate_on_failure=bool(d.get('compensate_on_failure')),
            timeout=_opt_float(d.get('timeout')),
            undo_timeout=_opt_float(d.get('undo_timeout')),
            delay=float(d.get('delay') or 0.0),
            pivot=bool(d.get('pivot')),
            child=Plan.from_list(d['child']) if d.get('child') else None,
        )

    def called_with(self, prev: Sequence[Any]
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The ``(args, kwargs)`` the step is called with.

        Like a chain link, a mutable step after the first stage gets the
        previous stage's result first (the list of results after a
        parallel stage).

        Arguments:
            prev: the results of the previous stage's steps, in order.
        """
        if self.stage == 0 or self.call.immutable:
            return tuple(self.call.args), dict(self.call.kwargs)
        first = prev[0] if len(prev) == 1 else list(prev)
        return (first, *self.call.args), dict(self.call.kwargs)

    def describe(self) -> str:
        if self.child is not None:
            return f'step {self.index} (nested saga)'
        return f'step {self.index} ({self.call.name})'


@dataclass(frozen=True)
class Plan:
    """An ordered list of stages, each a tuple of steps."""

    stages: tuple[tuple[StepSpec, ...], ...]

    def __post_init__(self) -> None:
        if not self.stages or not all(self.stages):
            raise ValueError('a saga needs at least one step in every stage')
        expected = 0
        for k, stage in enumerate(self.stages):
            for step in stage:
                if step.index != expected or step.stage != k:
                    raise ValueError(
                        f'{step.describe()} is out of order in the plan')
                expected += 1
        self._check_pivot()
        self._check_children()

    def _check_children(self) -> None:
        """A nested saga is compensatable: it may not contain a pivot, and
        it may not come after its parent's pivot (steps there are retried
        forward, never undone, and a child that failed has undone itself)."""
        pivot = self.pivot
        for step in self.steps:
            if step.child is None:
                continue
            if step.child.has_pivot():
                raise ValueError(
                    f'{step.describe()}: a nested saga cannot contain a pivot '
                    f'(compensate_pivot): it is undone as a unit when its '
                    f'parent compensates; make the pivot a step of the '
                    f'outermost saga')
            if pivot is not None and step.index > pivot.index:
                raise ValueError(
                    f'{step.describe()}: it comes after the pivot '
                    f'{pivot.describe()}; steps after a pivot are retried, '
                    f'never undone, and a nested saga undoes itself when it '
                    f'fails: put it before the pivot')

    def has_pivot(self) -> bool:
        """Whether this plan or one nested in it has a pivot."""
        return any(step.pivot or (step.child is not None
                                  and step.child.has_pivot())
                   for step in self.steps)

    @property
    def depth(self) -> int:
        """1 for a flat saga, plus one per level of nesting."""
        return 1 + max((step.child.depth for step in self.steps
                        if step.child is not None), default=0)

    @property
    def children(self) -> tuple[StepSpec, ...]:
        """The steps that are nested sagas."""
        return tuple(step for step in self.steps if step.child is not None)

    def to_list(self) -> list[dict[str, Any]]:
        """The steps as dicts (they carry their stage numbers)."""
        return [step.to_dict() for step in self.steps]

    @classmethod
    def from_list(cls, steps: Sequence[Mapping[str, Any]]) -> Plan:
        """Rebuild a plan from :meth:`to_list`."""
        built: list[list[StepSpec]] = []
        for d in steps:
            step = StepSpec.from_dict(d)
            while len(built) <= step.stage:
                built.append([])
            built[step.stage].append(step)
        return cls(tuple(tuple(stage) for stage in built))

    def with_arguments(self, args: Sequence[Any],
                       kwargs: Mapping[str, Any]) -> Plan:
        """The plan with ``args`` prepended to, and ``kwargs`` merged
        into, the calls of its first stage's mutable steps (what a nested
        saga is called with, as ``apply_async(args, kwargs)`` does)."""
        if not args and not kwargs:
            return self
        first = tuple(
            step if step.call.immutable else replace(step, call=replace(
                step.call, args=(*args, *step.call.args),
                kwargs={**step.call.kwargs, **kwargs}))
            for step in self.stages[0])
        return Plan((first, *self.stages[1:]))

    def _check_pivot(self) -> None:
        """At most one pivot, alone in its stage (a parallel member
        cannot be the point of no return: its siblings could still fail
        and compensate it), and no undo after it (nothing after the point
        of no return is undone)."""
        pivots = [step for step in self.steps if step.pivot]
        if len(pivots) > 1:
            raise ValueError(
                f'{pivots[1].describe()}: a saga has at most one pivot '
                f'(compensate_pivot), and {pivots[0].describe()} is one')
        if not pivots:
            return
        pivot = pivots[0]
        if len(self.stages[pivot.stage]) > 1:
            raise ValueError(
                f'{pivot.describe()}: a pivot (compensate_pivot) cannot be '
                f'a member of a parallel stage; make it a stage of its own')
        for step in self.steps[pivot.index + 1:]:
            if step.undo is not None:
                raise ValueError(
                    f'{step.describe()}: it comes after the pivot '
                    f'{pivot.describe()} and has an undo '
                    f'({step.undo.name}): steps after a pivot are retried, '
                    f'never undone; drop its compensate_with')

    @property
    def pivot(self) -> StepSpec | None:
        """The saga's pivot step, if it has one."""
        return next((step for step in self.steps if step.pivot), None)

    @classmethod
    def from_stages(cls, stages: Sequence[Sequence[tuple[Any, ...]]]) -> Plan:
        """Number the steps of ``stages``: lists of ``(call, undo, cof)``
        or ``(call, undo, cof, timeout, undo_timeout, delay[, pivot])``."""
        built: list[tuple[StepSpec, ...]] = []
        index = 0
        for k, stage in enumerate(stages):
            members = []
            for member in stage:
                members.append(StepSpec(index, k, *member))
                index += 1
            built.append(tuple(members))
        return cls(tuple(built))

    @property
    def steps(self) -> tuple[StepSpec, ...]:
        return tuple(step for stage in self.stages for step in stage)

    def __len__(self) -> int:
        return sum(len(stage) for stage in self.stages)


_SAGA_ID = re.compile(r'^[A-Za-z0-9_-]{1,128}$')
#: a nested saga's id: its parent's, ``~`` and its step index in the parent
_NESTED_ID = re.compile(r'^[A-Za-z0-9_-]{1,128}(?:~\d{1,6}){1,32}$')
_TASK_ID = re.compile(r'^(?P<saga>[A-Za-z0-9_-]{1,128}(?:~\d{1,6}){0,32})'
                      r'\.(?:s(?P<step>\d+)'
                      r'(?:\.(?P<generation>\d+))?|'
                      r'u(?P<undo>\d+)\.(?P<attempt>\d+))$')


def validate_saga_id(saga_id: str, nested: bool = False) -> str:
    """Return ``saga_id`` or raise :exc:`ValueError` naming it.

    Saga ids are embedded in task ids and Redis hash tags, so they may not
    contain dots, braces or whitespace.

    Arguments:
        nested: also accept the id of a nested saga (``<parent>~<step>``,
            which only a parent gives its child; looking one up is fine).
    """
    if isinstance(saga_id, str) and (
            _SAGA_ID.match(saga_id)
            or (nested and _NESTED_ID.match(saga_id))):
        return saga_id
    raise ValueError(
        f'invalid saga id {saga_id!r}: use 1-128 letters, digits, "-" or "_"'
        + (' (a nested saga\'s id adds "~<step>" per level)' if nested
           else ''))


def child_saga_id(saga_id: str, index: int) -> str:
    """The id of the nested saga that is step ``index`` of ``saga_id``.

    Derived, never chosen: a resent start finds the child it started, and
    the whole tree shares the root's shard (:func:`~.store.layout.shard_of`),
    so a command can change a parent and its child atomically."""
    return f'{saga_id}~{index}'


def parent_of(saga_id: str) -> tuple[str, int] | None:
    """``(parent id, step index)`` of a nested saga, or ``None``."""
    parent, sep, index = saga_id.rpartition('~')
    if not sep or not index.isdigit():
        return None
    return parent, int(index)


def nesting_depth(saga_id: str) -> int:
    """0 for an outermost saga, 1 for its children, and so on."""
    return saga_id.count('~')


def step_task_id(saga_id: str, index: int, generation: int = 0) -> str:
    """Task id of forward step ``index``: ``<saga_id>.s<index>``; a copy
    published again past the saga's pivot carries its publish generation,
    ``<saga_id>.s<index>.<generation>``, so that every report about a copy
    (even one from a worker's main process, with only the task id) says
    which copy it is, and a revoke of one copy does not stop the next."""
    if generation > 1:
        return f'{saga_id}.s{index}.{generation}'
    return f'{saga_id}.s{index}'


def undo_task_id(saga_id: str, index: int, attempt: int) -> str:
    """Task id of one attempt of step ``index``'s undo."""
    return f'{saga_id}.u{index}.{attempt}'


@dataclass(frozen=True)
class TaskIdInfo:
    """What a task id says about the saga it belongs to."""

    saga_id: str
    index: int
    is_undo: bool
    attempt: int = 0
    #: the publish generation a forward step's id carries (0: none, a
    #: first copy or one the sweep published again under the same id)
    generation: int = 0


def parse_task_id(task_id: str | None) -> TaskIdInfo | None:
    """Find the saga a task belongs to from its id alone.

    Notifications sent from a worker's main process (hard time limits, lost
    pool children, revokes) carry no message headers, only the task id.

    Returns:
        TaskIdInfo | None: ``None`` when the id is not a saga task id.
    """
    if not task_id or '.' not in task_id:
        return None
    m = _TASK_ID.match(task_id)
    if m is None:
        return None
    if m.group('step') is not None:
        return TaskIdInfo(m.group('saga'), int(m.group('step')), False,
                          generation=int(m.group('generation') or 0))
    return TaskIdInfo(m.group('saga'), int(m.group('undo')), True,
                      int(m.group('attempt')))


#: Publishing options a record may never carry (they would start tasks
#: outside the plan or break the saga's own ids): dropped when a step or an
#: undo read back from Redis is published.
FORBIDDEN_OPTIONS = frozenset({
    'link', 'link_error', 'callbacks', 'errbacks', 'chain', 'chord',
    'task_id', 'parent_id', 'root_id', 'group_id', 'group_index',
    'reply_to', 'subtask_type', 'immutable',
})


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def idempotency_key(saga_id: str, index: int) -> str:
    """Stable key for step ``index``'s undo, the same on every attempt."""
    return f'{saga_id}:{index}'


def undo_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before undo attempt ``attempt + 1``.

    Exponential: ``base``, ``2*base``, ``4*base`` … capped at ``cap``.

    Arguments:
        attempt: the attempt that just failed, counting from 1.
    """
    return float(min(cap, base * (2 ** max(0, attempt - 1))))
