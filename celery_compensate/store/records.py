"""What the store reads back: a saga record decoded into Python objects."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kombu.utils.json import loads

from ..model import (
    SagaState, StepSpec, StepState, UndoState, child_saga_id, parent_of,
    step_task_id, undo_task_id,
)
from . import layout as L

__all__ = ('StepRecord', 'SagaRecord', 'StepSummary', 'SagaSummary', 'Listed',
           'decode_record', 'listed_entry')


@dataclass(frozen=True)
class StepRecord:
    """What the store knows about one step and its undo.

    Times are Unix timestamps; ``started_at`` is when the step's stage was
    dispatched (the saga's start, or when the stage before it completed).
    """

    index: int
    stage: int
    task_name: str
    task_id: str
    undo_name: str | None
    state: StepState
    result: Any             #: what the step returned: its undo gets it
    started_at: float | None
    settled_at: float | None
    failure: str | None
    undo_state: UndoState
    #: number of the current (or last) attempt, counted over operator
    #: retries; 0 while the undo is not due
    undo_attempts: int
    undo_task_id: str | None    #: of the current (last) attempt
    undo_started_at: float | None   #: when the current attempt began
    #: the last failed attempt's error (kept after a later success)
    undo_error: str | None
    undone_at: float | None
    #: the saga's point of no return (``compensate_pivot``)
    pivot: bool = False
    #: past a completed pivot: the step's current (or last) forward
    #: attempt (1 until it failed once)
    attempts: int = 1
    #: the id of the nested saga this step is (``None``: a task)
    child: str | None = None

    @property
    def in_flight(self) -> bool:
        """Whether the step or its undo is dispatched and not settled."""
        return self.state is StepState.RUNNING or self.undo_state in (
            UndoState.QUEUED, UndoState.RUNNING, UndoState.WAITING)


@dataclass(frozen=True)
class SagaRecord:
    """A decoded saga hash."""

    saga_id: str
    state: SagaState
    created: float
    ended: float | None
    failed_step: int | None
    reason: str | None
    steps: list[StepRecord]
    #: operator retries (``compensate retry``) so far
    retries: int = 0
    #: when compensation was claimed (``None``: it never was)
    compensation_started: float | None = None
    #: the W3C ``traceparent`` of the span the saga was started in (with
    #: tracing on, when there was one)
    trace_parent: str | None = None
    #: a nested saga's parent id and its step index there
    parent: tuple[str, int] | None = None

    @property
    def current(self) -> list[StepRecord]:
        """What the saga waits for: its steps in flight (running forward,
        or their undos queued or running), else the undos that failed for
        good (COMPENSATION_FAILED), or the steps past the pivot that did
        (FORWARD_FAILED)."""
        busy = [s for s in self.steps if s.in_flight]
        return busy or [s for s in self.steps
                        if s.undo_state is UndoState.FAILED
                        or (s.state is StepState.FAILED
                            and self.state is SagaState.FORWARD_FAILED)]


@dataclass(frozen=True)
class StepSummary:
    """One step a listed saga waits for (a running step, an undo in
    flight, or an undo failed for good)."""

    index: int
    task_name: str
    undo_name: str | None
    state: StepState
    undo_state: UndoState
    undo_attempts: int
    undo_error: str | None      #: cut to the listing's width


@dataclass(frozen=True)
class SagaSummary:
    """What a listing reads of one saga (``lua/summary.lua``): a few
    fields and at most a few steps, whatever the saga's size."""

    state: SagaState
    reason: str | None          #: cut to the listing's width
    #: how many steps the saga waits for (``steps`` shows the first few)
    waiting: int
    #: ``waiting`` counts undos failed for good, not steps in flight
    failed_undos: bool
    steps: list[StepSummary]


@dataclass(frozen=True)
class Listed:
    """One saga found by :meth:`SagaStore.list_sagas`: its summary, or why
    it could not be read."""

    saga_id: str
    created: float
    summary: SagaSummary | None
    error: str | None = None

    @property
    def state(self) -> str:
        """The saga's state, or ``CORRUPT`` when its record is damaged."""
        return self.summary.state.value if self.summary else 'CORRUPT'


def listed_entry(saga_id: str, created: float, raw: Any) -> Listed | None:
    """Decode one reply of ``summary.lua`` for a listing (``None``: the
    saga has expired)."""
    if isinstance(raw, Exception):
        return Listed(saga_id, created, None, str(raw))
    if not raw:
        return None
    try:
        state, _, reason, waiting, kind = raw[:5]
        rest = raw[5:]
        steps = [StepSummary(
            index=int(i), task_name=task, undo_name=undo or None,
            state=StepState(s), undo_state=UndoState(x),
            undo_attempts=int(a), undo_error=e or None)
            for i, task, undo, s, x, a, e in (
                rest[n:n + 7] for n in range(0, len(rest), 7))]
        return Listed(saga_id, created, SagaSummary(
            state=SagaState(state), reason=reason or None,
            waiting=int(waiting), failed_undos=bool(int(kind)),
            steps=steps))
    except (KeyError, ValueError, TypeError) as exc:
        return Listed(saga_id, created, None, repr(exc))


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def decode_record(saga_id: str, raw: dict[str, str]) -> SagaRecord:
    """Decode a saga hash (as ``HGETALL`` returns it).

    Raises:
        KeyError, ValueError, TypeError: the record is damaged.
    """
    created = float(raw[L.CREATED])
    specs = [StepSpec.from_dict(loads(raw[L.spec(i)]))
             for i in range(int(raw[L.N]))]
    # a stage is dispatched when the one before it completes: its last
    # member's settle time
    settled = [_float(raw.get(L.settled_at(i))) for i in range(len(specs))]
    starts: dict[int, float | None] = {0: created}
    for spec in specs:
        if spec.stage > 0 and spec.stage not in starts:
            before = [settled[s.index] for s in specs
                      if s.stage == spec.stage - 1]
            times = [t for t in before if t is not None]
            starts[spec.stage] = (max(times) if times
                                  and len(times) == len(before) else None)
    steps = []
    for i, spec in enumerate(specs):
        state = StepState(raw[L.step_state(i)])
        attempts = int(raw.get(L.attempt(i), 0))
        steps.append(StepRecord(
            index=i, stage=spec.stage, task_name=spec.call.name,
            # a copy published again past the pivot has an id of its own
            task_id=step_task_id(
                saga_id, i, int(raw.get(L.generation(i), 1))
                if int(raw.get(L.forward_attempt(i), 1)) > 1 else 0),
            undo_name=spec.undo.name if spec.undo else None,
            state=state,
            result=loads(raw[L.result(i)]) if L.result(i) in raw else None,
            started_at=(None if state is StepState.PENDING
                        else starts.get(spec.stage)),
            settled_at=settled[i],
            failure=raw.get(L.failure(i)),
            undo_state=UndoState(raw.get(L.undo_state(i), '')),
            undo_attempts=attempts,
            undo_task_id=(undo_task_id(saga_id, i, attempts) if attempts
                          else None),
            undo_started_at=_float(raw.get(L.undo_started(i))),
            undo_error=raw.get(L.undo_error(i)),
            undone_at=_float(raw.get(L.undone_at(i))),
            pivot=spec.pivot,
            attempts=int(raw.get(L.forward_attempt(i), 1)),
            child=(child_saga_id(saga_id, i) if spec.child is not None
                   else None),
        ))
    failed = raw.get(L.FAILED)
    return SagaRecord(
        saga_id=saga_id, state=SagaState(raw[L.STATE]),
        created=created, ended=_float(raw.get(L.ENDED)),
        failed_step=int(failed) if failed else None,
        reason=raw.get(L.REASON), steps=steps,
        retries=int(raw.get(L.RETRIES, 0)),
        compensation_started=_float(raw.get(L.CSTART)),
        trace_parent=raw.get(L.TRACE_PARENT),
        parent=parent_of(saga_id) if L.UP in raw else None,
    )
