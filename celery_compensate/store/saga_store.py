"""The saga store: one Redis hash per saga, advanced only by the Lua
commands in ``lua/`` (where every transition is written once).  Python
sends them, reads records, and decodes replies; :mod:`.layout` names the
keys and fields, :class:`~.replies.Reply` the statuses.
"""
from __future__ import annotations

import heapq
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import redis
from celery.utils.log import get_logger
from kombu.utils.json import dumps, loads

from ..clients import connect
from ..exceptions import (
    CorruptSagaRecord, SagaNotFound, SagaStoreError, SagaStoreUnavailable,
)
from ..model import (
    Plan, SagaState, StepSpec, StepState, child_saga_id, parent_of,
)
from ..settings import Settings
from . import layout as L
from .layout import SHARDS, Keys, shard_of
from .records import Listed, SagaRecord, decode_record, listed_entry
from .replies import CORRUPT, Reply
from .scripts import COMMANDS, Source, assemble, explain

__all__ = ('SagaStore', 'Outcome', 'UndoDue', 'ChildReport', 'new_token', 'make_client',
           'TRANSIENT_ERRORS', 'TRIM_LIMIT')

logger = get_logger(__name__)


@dataclass(frozen=True)
class UndoDue:
    """An undo attempt that must be published now."""

    step: StepSpec
    result: Any
    prev: list[Any]         #: results of the stage before the step's
    attempt: int
    #: seconds to wait before it is sent (the backoff after a lost attempt)
    countdown: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What a script did to a saga and what must be published because of it.

    ``status`` names what happened (see each command's header in ``lua/``).
    """

    status: Reply
    old_state: SagaState | None = None
    new_state: SagaState | None = None
    results: list[Any] = field(default_factory=list)
    forward: list[StepSpec] = field(default_factory=list)
    undos: list[UndoDue] = field(default_factory=list)
    #: steps given up by the call (lost by a dead worker, or aborted)
    stopped: list[int] = field(default_factory=list)
    #: the publish generation of each step of ``forward`` published again
    #: by the sweep (a step published for the first time is absent: 1)
    generations: dict[int, int] = field(default_factory=dict)
    #: seconds before each step of ``forward`` retried past a pivot may
    #: run (the retry backoff); absent: at once
    countdowns: dict[int, float] = field(default_factory=dict)
    #: running steps that nested sagas hold (an abort aborts them)
    children: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ChildReport:
    """What a settled nested saga tells its parent (``lua/report.lua``)."""

    state: SagaState
    #: its step index in the parent (``None``: an outermost saga)
    index: int | None
    #: the parent's undo attempt it compensated for (``None``: it failed
    #: or was aborted on its own, before its parent undid it)
    undo_for: int | None
    #: the token of the report it owes (``None``: none owed)
    token: str | None
    #: why it compensated
    reason: str
    #: the results of its last stage, when it completed
    results: list[Any]
    #: its parent is the saga that started it (``False``: a leftover of
    #: an earlier saga with the parent's id, which reports nothing)
    mine: bool = True


def _state(value: Any) -> SagaState | None:
    return SagaState(value) if value else None


class SagaStore:
    """Saga records in one Redis (one per app and process).

    Arguments:
        settings: the app's validated settings.
    """

    def __init__(self, settings: Settings,
                 socket_timeout: float | None = None,
                 retries: int = 3) -> None:
        self.settings = settings
        self.client = make_client(settings, socket_timeout, retries)
        self.keys = Keys(settings.key_prefix)
        #: each command's assembled source, by its script's SHA1 (to name
        #: the file and line of an error raised inside it)
        self.sources: dict[str, Source] = {}
        self._commands: dict[str, Any] = {}
        for name in COMMANDS:
            source = assemble(name)
            script = self.client.register_script(source.text)
            self._commands[name] = script
            self.sources[script.sha] = source

    def command(self, name: str) -> Any:
        """The registered script of command ``name`` (``lua/<name>.lua``),
        to call as ``script(keys=..., args=..., client=...)``."""
        return self._commands[name]

    # -- writes ---------------------------------------------------------

    def create(self, saga_id: str, plan: Plan,
               specs: Sequence[str] | None = None,
               trace_parent: str | None = None) -> bool:
        """Store a new saga with its first stage marked dispatched.

        Arguments:
            specs: each step's spec already encoded as JSON (the canvas
                encodes them once, when it validates the saga).
            trace_parent: the W3C ``traceparent`` of the span the saga is
                started in (tracing), kept in the record.

        Returns:
            bool: ``False`` if a saga with this id already exists.
        Raises:
            SagaStoreUnavailable: Redis cannot be reached.
        """
        return self.start(saga_id, plan, specs, trace_parent) is Reply.CREATED

    def start(self, saga_id: str, plan: Plan,
              specs: Sequence[str] | None = None,
              trace_parent: str | None = None,
              parent: tuple[str, int] | None = None,
              token: str | None = None) -> Reply:
        """Store a new saga (see :meth:`create`); a nested one (``parent``:
        its parent's id and its step index there) takes its step in the
        parent in the same call.  Resending with the same ``token`` is
        safe (``created`` again).

        Returns:
            Reply: ``created``, ``exists``, or for a nested saga ``orphan``
            (its parent no longer waits for it: nothing written).
        """
        default = self.settings.step_timeout
        fields: list[Any] = [
            L.STATE, SagaState.RUNNING.value, L.CREATED, repr(time.time()),
            L.QT, self.settings.queue_timeout,
            L.N, len(plan), L.NS, len(plan.stages), L.CUR, 0,
            L.waiting(0), len(plan.stages[0]),
        ]
        if trace_parent:
            fields += [L.TRACE_PARENT, trace_parent]
        if specs is None:
            specs = [dumps(step.to_dict()) for step in plan.steps]
        for k, stage in enumerate(plan.stages):
            fields += [L.members(k), ','.join(str(s.index) for s in stage)]
            for step in stage:
                i = step.index
                fields += [L.spec(i), specs[i], L.stage(i), k,
                           L.undo_flag(i), step.undo_flag,
                           L.step_state(i), (StepState.RUNNING if k == 0
                                             else StepState.PENDING).value,
                           L.lease(i), step.timeout or default,
                           L.undo_lease(i), step.undo_timeout or default]
                if step.delay:
                    fields += [L.countdown(i), step.delay]
        if plan.pivot is not None:
            fields += [L.PIVOT, plan.pivot.index]
        if plan.children:
            fields += [L.KIDS, ','.join(str(s.index) for s in plan.children)]
        keys = self.keys.for_saga(saga_id)
        extra: list[Any] = []
        if parent is not None:
            # its report is overdue after a step lease (its reporter died)
            fields += [L.UP, parent[1], L.REPORT_GRACE, default]
            keys.append(self.keys.saga(parent[0]))
            extra.append(parent[1])
        args = [token or new_token(), saga_id,
                dumps([str(f) for f in fields]), *extra]
        return Reply(self._run(self._commands['start'], keys=keys, args=args))

    def step_done(self, saga_id: str, index: int, result_json: str,
                  token: str | None = None) -> Outcome:
        """Record step ``index`` as completed with its result (one round
        trip) and return what must be dispatched next.  Resending with the
        same ``token`` is safe."""
        return self._decoded(saga_id, self._change(
            'step_done', saga_id, token, index, result_json), result_json)

    def step_failed(self, saga_id: str, index: int, reason: str,
                    placeholder: str = '',
                    generation: int | None = None,
                    stopped: bool = False,
                    token: str | None = None) -> Outcome:
        """Record step ``index`` as failed; claims compensation if the saga
        was running.  Past a completed pivot the step is published again
        instead (``forward-retry``), or, its attempts spent, the saga is
        ``FORWARD_FAILED``.

        Arguments:
            placeholder: the body returned but its result cannot be stored:
                this JSON stands for it, and the step is undone like a
                completed one.
            generation: the publish generation of the copy that failed,
                when known: the failure of an older copy than the one in
                flight changes nothing.
            stopped: the step was stopped on purpose (revoked): past the
                pivot it is not tried again.
            token: makes resending safe (a nested saga's report).
        """
        s = self.settings
        return self._decoded(saga_id, self._change(
            'step_failed', saga_id, token, index, reason[:2000], placeholder,
            '' if generation is None else generation,
            s.forward_max_attempts, s.undo_retry_backoff,
            s.undo_retry_backoff_max, '1' if stopped else ''))

    def undo_begin(self, saga_id: str, index: int, attempt: int,
                   token: str) -> Reply:
        """Let one copy of an undo attempt run: :attr:`Reply.RUN`, or why
        not (see ``lua/undo_begin.lua``)."""
        return Reply(self._change('undo_begin', saga_id, token, index,
                                  attempt))

    def undo_release(self, saga_id: str, index: int, begin_token: str) -> bool:
        """The copy let in by ``begin_token`` stops without an outcome
        (Celery retries it); let the retry in."""
        return Reply(self._change('undo_release', saga_id, None, index,
                                  begin_token)) is Reply.RELEASED

    def undo_sent(self, saga_id: str,
                  sent: Sequence[tuple[int, int, float]]) -> Reply:
        """The undo attempts ``(step index, attempt, countdown)`` were
        published: they now wait under the queue lease (see
        ``lua/undo_sent.lua``)."""
        args = [str(v) for entry in sent for v in entry]
        return Reply(self._change('undo_sent', saga_id, None, *args))

    def undo_done(self, saga_id: str, index: int,
                  token: str | None = None) -> Outcome:
        """Record step ``index`` as undone.  Resending with the same
        ``token`` is safe."""
        return self._decoded(saga_id, self._change('undo_done', saga_id,
                                                   token, index))

    def undo_failed(self, saga_id: str, index: int, attempt: int,
                    error: str, started: bool = True,
                    countdown: float = 0.0, final: bool = False,
                    token: str | None = None,
                    nested: bool = False) -> Outcome:
        """Count a failed undo attempt; the outcome holds the next attempt
        (status ``retry``) or the saga is COMPENSATION_FAILED (``failed``).

        Arguments:
            started: whether the failing copy had begun running; one that
                never started does not count while another copy runs.
            countdown: seconds until the next attempt is sent (its lease
                starts after them).
            final: no more attempts (a nested saga that is
                COMPENSATION_FAILED spent its own).
            token: makes resending safe (a nested saga's report).
            nested: the undo is a nested saga's own compensation, which
                may fail after it was recorded done (its late completer's
                undo spent its attempts): then it is failed again.
        """
        return self._decoded(saga_id, self._change(
            'undo_failed', saga_id, token, index, attempt, error[:2000],
            0 if final else self.settings.undo_max_attempts,
            '1' if started else '0', countdown, '1' if nested else ''))

    def receive(self, saga_id: str, index: int, attempt: int | None,
                generation: int, holder: str) -> Reply:
        """A worker took step ``index`` (or attempt ``attempt`` of its
        undo) from the broker: mark it held by ``holder``, or say why the
        copy must not run (see ``lua/receive.lua``)."""
        return Reply(self._change(
            'receive', saga_id, '', index,
            '' if attempt is None else attempt, generation, holder))

    def receive_many(self, items: Iterable[tuple[str, int, int | None, int,
                                               str]]) -> list[Reply]:
        """:meth:`receive` for many tasks, in one round trip.

        Arguments:
            items: ``(saga id, step index, undo attempt or None, publish
                generation, holder)`` tuples.
        """
        return [Reply(r) for r in self._batch([
            ('receive', saga_id, [index, '' if attempt is None else attempt,
                                  generation, holder])
            for saga_id, index, attempt, generation, holder in items])]

    def renew(self, held: Iterable[tuple[str, int, int | None] |
                                   tuple[str, int, int | None, str]]) -> int:
        """Extend the leases of the steps and undo attempts a live worker
        holds, in one round trip.

        Arguments:
            held: ``(saga id, step index, undo attempt or None[, holder])``
                tuples; the holder (default ``-``) is recorded for what
                nobody holds yet (its receipt was not recorded).
        Returns:
            int: how many were still in flight (and renewed).
        """
        return sum(Reply(r) is Reply.RENEWED for r in self._batch([
            ('renew', saga_id, [index, '' if attempt is None else attempt,
                                holder[0] if holder else '-'])
            for saga_id, index, attempt, *holder in held]))

    def left(self, gone: Iterable[tuple[str, int, str, bool]]) -> list[Reply]:
        """Report the forward steps that left a worker, in one round trip:
        a succeeded one confirms what its completion dispatched
        (``lua/confirm.lua``), any other is queued again if its copy still
        holds it (``lua/release.lua``).

        Arguments:
            gone: ``(saga id, step index, holder, succeeded)`` tuples.
        Returns:
            list: each one's reply.
        """
        return [Reply(r) for r in self._batch([
            ('confirm', saga_id, [index]) if succeeded else
            ('release', saga_id, [index, holder])
            for saga_id, index, holder, succeeded in gone])]

    def confirm_first_stage(self, saga_id: str) -> Reply:
        """The starter of a nested saga published its first stage: the
        members no worker received yet leave the outbox for the queue
        lease (``lua/confirm.lua`` with step ``-1``)."""
        return Reply(self._change('confirm', saga_id, None, -1))

    def due(self, limit: int, gap: float, hold: float
            ) -> tuple[float, list[str], list[int]]:
        """Scan every shard of the deadline index (one round trip).

        Arguments:
            limit: at most this many sagas per shard.
            gap: seconds since a shard's last sweep after which its
                lapsed leases are not trusted (Redis was away).
            hold: how long such a shard is then left alone.
        Returns:
            tuple: the longest hold still running, the ids of the sagas
            due, and the shards that returned ``limit`` ids (more due).
        """
        pipe = self.client.pipeline(transaction=False)
        for shard in range(SHARDS):
            self._commands['scan'](
                keys=self.keys.for_shard(shard),
                args=[limit, gap, hold, math.ceil(2 * gap) + 1, TRIM_LIMIT],
                client=pipe)
        held, ids, full = 0.0, [], []
        for shard, (wait, due) in enumerate(self._run(pipe.execute)):
            held = max(held, float(wait))
            ids.extend(due)
            if len(due) >= limit:
                full.append(shard)
        return held, ids, full

    def recover(self, saga_id: str) -> Outcome:
        """Act on the lapsed leases of one saga (``lua/recover.lua``)."""
        return self._decoded(saga_id, self._change(
            'recover', saga_id, None, saga_id,
            self.settings.undo_max_attempts, self.settings.undo_retry_backoff,
            self.settings.undo_retry_backoff_max,
            self.settings.forward_max_attempts))

    def quarantine(self, saga_id: str) -> None:
        """Take a saga the sweep cannot process out of the deadline index
        (into the shard's ``bad`` set, for an operator)."""
        shard = shard_of(saga_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.due(shard), saga_id)
        pipe.zadd(self.keys.bad(shard), {saga_id: time.time()})
        self._run(pipe.execute)

    def abort(self, saga_id: str, reason: str,
              token: str | None = None) -> Outcome:
        """Stop a running saga: give up its in-flight steps and claim
        compensation (status ``aborted``, or ``not-running``/``missing``)."""
        return self._decoded(saga_id, self._change(
            'abort', saga_id, token, reason[:2000],
            self.settings.heartbeat_interval))

    def retry(self, saga_id: str, token: str | None = None) -> Outcome:
        """Re-drive a COMPENSATION_FAILED saga from the undos that failed,
        or a FORWARD_FAILED one from the steps past its pivot that failed
        (status ``retried``, or ``wrong-state``/``missing``, which change
        nothing)."""
        return self._decoded(saga_id, self._change('retry', saga_id,
                                                   token))

    def unwind(self, saga_id: str, index: int, attempt: int,
               token: str | None = None) -> Outcome:
        """Attempt ``attempt`` of the undo of step ``index`` of
        ``saga_id``, a nested saga: undo the child as a unit (see
        ``lua/unwind.lua``); the outcome's undos are the child's."""
        child = child_saga_id(saga_id, index)
        return self._decoded(child, self._change(
            'unwind', child, token, index, attempt,
            extra_keys=[self.keys.saga(saga_id)]))

    def report(self, saga_id: str) -> ChildReport | None:
        """What nested saga ``saga_id`` owes its parent (``None``: no such
        saga).

        Raises:
            CorruptSagaRecord: a result in its last stage is not JSON.
        """
        up_id = parent_of(saga_id)
        if up_id is None:
            return None
        reply = self._run(self._commands['report'],
                          keys=[self.keys.saga(saga_id),
                                self.keys.saga(up_id[0])], args=[])
        if not reply:
            return None
        state, up, undo_for, token, reason, results, mine = reply
        try:
            decoded = [loads(r) for r in results]
        except ValueError as exc:
            raise CorruptSagaRecord(
                f'saga {saga_id!r}: a result of its last stage is not '
                f'JSON: {exc}') from exc
        return ChildReport(
            SagaState(state), int(up) if up else None,
            int(undo_for) if undo_for else None, token or None,
            reason, decoded, bool(mine))

    def reported(self, saga_id: str, token: str) -> Reply:
        """The report ``token`` of nested saga ``saga_id`` reached its
        parent: ``reported``, or ``gone`` (settled already, or replaced)."""
        return Reply(self._change('reported', saga_id, token))

    def forget(self, saga_id: str) -> tuple[Reply, SagaState | None]:
        """Delete a finished saga's record and index entries
        (``lua/forget.lua``): ``forgotten``, ``not-finished`` (it is
        running or compensating: nothing changed) or ``missing``, with the
        state it was in."""
        reply = self._change('forget', saga_id, None)
        return Reply(reply[0]), _state(reply[1] if len(reply) > 1 else None)

    # -- reads ----------------------------------------------------------

    def get_state(self, saga_id: str) -> SagaState:
        """Raises: SagaNotFound, SagaStoreUnavailable, CorruptSagaRecord."""
        value = self._run(self.client.hget, self.keys.saga(saga_id), L.STATE)
        if value is None:
            raise SagaNotFound(saga_id)
        try:
            return SagaState(value)
        except ValueError:
            raise CorruptSagaRecord(
                f'saga {saga_id!r} has an unknown state {value!r}') from None

    def step_status(self, saga_id: str, index: int
                    ) -> tuple[str | None, Any, int]:
        """Forward state code of step ``index``, its recorded result and
        its publish generation (``(None, None, 1)`` when the saga does not
        exist)."""
        step, result, generation = self._run(
            self.client.hmget, self.keys.saga(saga_id),
            [L.step_state(index), L.result(index), L.generation(index)])
        return (step, loads(result) if result else None,
                int(generation or 1))

    def read(self, saga_id: str) -> SagaRecord:
        """Decode the whole saga record.

        Raises:
            SagaNotFound: no such saga.
            CorruptSagaRecord: the record cannot be decoded.
        """
        try:
            raw = self._run(self.client.hgetall, self.keys.saga(saga_id))
        except CorruptSagaRecord as exc:
            raise CorruptSagaRecord(f'saga {saga_id!r}: {exc}') from exc
        if not raw:
            raise SagaNotFound(saga_id)
        try:
            return decode_record(saga_id, raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptSagaRecord(
                f'saga {saga_id!r} has a corrupt record: {exc!r}') from exc

    def fields(self, saga_id: str, *names: str) -> dict[str, str | None]:
        """Some fields of a saga's hash (:mod:`.layout` names), in one
        read; ``None`` for a field that is not set (every field, when the
        saga does not exist).

        Raises:
            SagaStoreUnavailable: Redis cannot be reached.
        """
        values = self._run(self.client.hmget, self.keys.saga(saga_id),
                           list(names))
        return dict(zip(names, values, strict=True))

    def created_at(self, saga_id: str) -> float:
        """When the saga was started.

        Raises:
            SagaNotFound: no saga with this id.
        """
        value = self._run(self.client.hget, self.keys.saga(saga_id),
                          L.CREATED)
        if value is None:
            raise SagaNotFound(saga_id)
        return float(value)

    def list_sagas(self, state: SagaState | None = None, limit: int = 50,
                   page: int = 100, steps: int = 3,
                   width: int = 120, before: float | None = None,
                   children: bool = True) -> list[Listed]:
        """The newest sagas first, read from the per-shard indexes (never
        ``KEYS``): the unfinished ones when ``state`` is RUNNING,
        COMPENSATING, COMPENSATION_FAILED or FORWARD_FAILED, else every
        stored one.

        Each saga is read as a bounded summary (``lua/summary.lua``),
        never whole: a saga of thousands of steps or with megabytes of
        arguments costs the listing a few hundred bytes.

        Arguments:
            state: only sagas in this state (a damaged record, listed as
                ``CORRUPT``, only shows without a state).
            limit: at most this many.
            page: ids read per shard and summaries per round trip.
            steps: at most this many of a saga's steps in its summary.
            width: texts (reason, undo error) cut to this many characters.
            before: only sagas started before this time (the next page
                after a saga started then).
            children: also nested sagas (``False``: outermost ones only;
                nested ones are skipped before they are read).
        Raises:
            SagaStoreUnavailable: Redis cannot be reached.
        """
        live = state in (SagaState.RUNNING, SagaState.COMPENSATING,
                         SagaState.COMPENSATION_FAILED,
                         SagaState.FORWARD_FAILED)
        keys = [self.keys.live(s) if live else self.keys.sagas(s)
                for s in range(SHARDS)]
        found: list[Listed] = []
        batch: list[tuple[str, float]] = []
        summary = self._commands['summary']
        args = [steps, width, state.value if state else '']

        def flush() -> None:
            pipe = self.client.pipeline(transaction=False)
            for saga_id, _ in batch:
                summary(keys=[self.keys.saga(saga_id)], args=args,
                        client=pipe)
            try:
                raws = self._run(pipe.execute, raise_on_error=False)
            except CorruptSagaRecord:
                # a record that is not UTF-8 text: find which, one by one
                raws = [self._summary_or_error(saga_id, args)
                        for saga_id, _ in batch]
            for (saga_id, created), raw in zip(batch, raws, strict=True):
                if isinstance(raw, list) and len(raw) == 1:
                    continue        # in another state
                entry = listed_entry(saga_id, created, raw)
                if entry is not None and (
                        state is None or entry.state == state.value):
                    found.append(entry)
            batch.clear()

        top = '+inf' if before is None else f'({before!r}'
        for saga_id, created in self._newest(keys, page, top):
            if not children and parent_of(saga_id) is not None:
                continue
            batch.append((saga_id, created))
            if len(batch) >= page:
                flush()
                if len(found) >= limit:
                    break
        if batch and len(found) < limit:
            flush()
        return found[:limit]

    def _newest(self, keys: list[str], page: int, top: str = '+inf'
                ) -> Iterator[tuple[str, float]]:
        """Merge sorted sets scored by time, newest first, each read a page
        at a time below the last score seen (the first page of all in one
        round trip), so sagas starting or finishing meanwhile shift
        nothing; each id is yielded once."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zrevrangebyscore(key, top, '-inf', start=0, num=page,
                                  withscores=True)
        buffers = [deque(entries) for entries in self._run(pipe.execute)]
        more = [len(b) == page for b in buffers]
        seen: set[str] = set()
        heap = [(-b[0][1], b[0][0], n) for n, b in enumerate(buffers) if b]
        heapq.heapify(heap)
        while heap:
            score, saga_id, n = heapq.heappop(heap)
            buf = buffers[n]
            buf.popleft()
            if saga_id not in seen:
                seen.add(saga_id)
                yield saga_id, -score
            if not buf and more[n]:
                # from the last score on (ties included; ids seen skipped)
                entries = self._run(
                    self.client.zrevrangebyscore, keys[n], -score, '-inf',
                    start=0, num=page, withscores=True)
                fresh = [e for e in entries if e[0] not in seen]
                if not fresh and len(entries) == page:
                    # a whole page of one score: step past it
                    fresh = self._run(
                        self.client.zrevrangebyscore, keys[n], f'({-score}',
                        '-inf', start=0, num=page, withscores=True)
                    entries = fresh
                buf.extend(fresh)
                more[n] = len(entries) == page
            if buf:
                heapq.heappush(heap, (-buf[0][1], buf[0][0], n))

    def _summary_or_error(self, saga_id: str, args: list[Any]) -> Any:
        try:
            return self._run(self._commands['summary'],
                             keys=[self.keys.saga(saga_id)], args=args)
        except SagaStoreUnavailable:
            raise
        except SagaStoreError as exc:
            return exc

    # -- plumbing -------------------------------------------------------

    def _change(self, command: str, saga_id: str, token: str | None,
                *args: Any, extra_keys: Sequence[str] = ()) -> Any:
        """Run a command that changes a saga (``lua/<command>.lua``):
        token, now, ttl, then ``args``."""
        try:
            return self._run(self._commands[command],
                             keys=[*self.keys.for_saga(saga_id),
                                   *extra_keys], args=[
                token or new_token(), repr(time.time()),
                self.settings.result_expires, *args])
        except CorruptSagaRecord as exc:
            raise CorruptSagaRecord(f'saga {saga_id!r}: {exc}') from exc

    def _batch(self, calls: list[tuple[str, str, list[Any]]]) -> list[Any]:
        """Run ``(command, saga id, args after token/now/ttl)`` calls in one
        round trip: a pipeline, or the script itself when there is one call
        (a pipeline of scripts costs redis-py an extra ``SCRIPT EXISTS``
        round trip, which a worker's per-message receipts would pay)."""
        def args(rest: list[Any]) -> list[Any]:
            return ['', 0, 0, *rest]
        if len(calls) == 1:
            name, saga_id, rest = calls[0]
            return [self._run(self._commands[name],
                              keys=self.keys.for_saga(saga_id),
                              args=args(rest))]
        pipe = self.client.pipeline(transaction=False)
        for name, saga_id, rest in calls:
            self._commands[name](keys=self.keys.for_saga(saga_id),
                                 args=args(rest), client=pipe)
        return self._run(pipe.execute) if calls else []

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TRANSIENT_ERRORS as exc:
            raise SagaStoreUnavailable(
                f'saga store at {self.settings.safe_redis_url} is '
                f'unreachable: {exc}') from exc
        except redis.ResponseError as exc:
            if str(exc).startswith(CORRUPT):
                raise CorruptSagaRecord(
                    str(exc)[len(CORRUPT):].lstrip()) from exc
            if str(exc).rpartition('caused error: ')[2].startswith(
                    _TRANSIENT_REPLIES):
                raise SagaStoreUnavailable(
                    f'saga store at {self.settings.safe_redis_url} is '
                    f'unreachable: {exc}') from exc
            # an error inside a command names its file and line
            raise SagaStoreError(
                f'saga store at {self.settings.safe_redis_url} failed: '
                f'{explain(str(exc), self.sources)}') from exc
        except redis.RedisError as exc:
            raise SagaStoreError(
                f'saga store at {self.settings.safe_redis_url} failed: '
                f'{exc}') from exc
        except UnicodeDecodeError as exc:
            # records hold JSON text only; never decoded any other way
            raise CorruptSagaRecord(
                'a saga record holds bytes that are not UTF-8 text (records '
                f'are JSON): {exc}') from exc

    def _decoded(self, saga_id: str, reply: list[Any],
                 own: str | None = None) -> Outcome:
        try:
            return self._outcome(reply, own)
        except CorruptSagaRecord as exc:
            raise CorruptSagaRecord(f'saga {saga_id!r}: {exc}') from exc

    @staticmethod
    def _outcome(reply: list[Any], own: str | None = None) -> Outcome:
        """Decode a script's reply.

        Raises:
            CorruptSagaRecord: a spec or result in the record is not valid
                JSON (what the script changed stays changed, and the sweep
                quarantines the saga).
        """
        status = Reply(reply[0])
        if len(reply) < 3:
            return Outcome(status)
        try:
            # '' is the calling step's own result, which is not sent back
            results = [loads(own if r == '' and own is not None else r)
                       for r in reply[3]] if len(reply) > 3 else []
            forward, generations, countdowns = [], {}, {}
            for entry in (reply[4] if len(reply) > 4 else ()):
                forward.append(StepSpec.from_dict(loads(entry[1])))
                if len(entry) > 2:
                    generations[int(entry[0])] = int(entry[2])
                if len(entry) > 3:
                    countdowns[int(entry[0])] = float(entry[3])
            undos = []
            for _, spec, result, prev, attempt, countdown in (
                    reply[5] if len(reply) > 5 else ()):
                undos.append(UndoDue(StepSpec.from_dict(loads(spec)),
                                     loads(result), [loads(r) for r in prev],
                                     int(attempt), float(countdown)))
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptSagaRecord(
                f'a saga record holds a step that cannot be decoded: {exc!r}'
            ) from exc
        stopped = [int(i) for i in reply[6]] if len(reply) > 6 else []
        children = [int(i) for i in reply[7]] if len(reply) > 7 else []
        return Outcome(status, _state(reply[1]), _state(reply[2]), results,
                       forward, undos, stopped, generations, countdowns,
                       children)


#: Errors after which the same call may succeed: connection trouble (also
#: no Sentinel knowing the primary, no cluster node answering), a replica
#: promoted (READONLY), a full Redis (OOM under noeviction), a cluster
#: resharding (TRYAGAIN) or failing over (CLUSTERDOWN, MASTERDOWN, too
#: many redirections), a Redis loading its data.
TRANSIENT_ERRORS = tuple(cls for cls in (
    redis.ConnectionError, redis.TimeoutError,
    getattr(redis.exceptions, 'ReadOnlyError', None),
    getattr(redis.exceptions, 'OutOfMemoryError', None),
    getattr(redis.exceptions, 'TryAgainError', None),
    getattr(redis.exceptions, 'BusyLoadingError', None),
    getattr(redis.exceptions, 'ClusterError', None),
    getattr(redis.exceptions, 'SlotNotCoveredError', None),
) if cls is not None)

#: Error replies (without a redis-py class) after which the same call may
#: succeed: a primary with ``min-replicas-to-write`` that lost its replicas,
#: e.g. a former primary after a Sentinel failover, until it is demoted.
_TRANSIENT_REPLIES = ('NOREPLICAS',)

#: Expired sagas each sweep drops from one shard's listing index: with 64
#: shards and the default 10 s interval, 6,400 sagas finishing a second.
TRIM_LIMIT = 1000


def new_token() -> str:
    """A token identifying one call (and its resends) to a script."""
    return uuid.uuid4().hex


def make_client(settings: Settings, socket_timeout: float | None = None,
                retries: int = 3) -> Any:
    """A client for the saga store, retrying briefly on connection errors:
    a :class:`redis.Redis` for one server or the primary behind Sentinels
    (following a failover), a :class:`~.clients.LazyRedisCluster` for a
    Redis Cluster.

    Arguments:
        socket_timeout: instead of ``compensate_redis_socket_timeout``.
        retries: resends of a command whose connection broke.
    """
    return connect(settings.redis_url, settings.redis_transport_options,
                   settings.redis_socket_timeout if socket_timeout is None
                   else socket_timeout, retries)


