"""Where the store keeps things: every Redis key and every saga hash field.

This module is the only Python place that spells a key or a field; the Lua
commands in ``lua/`` are the only other one (``tests/store`` checks that
every field a command writes is named here).

Keys
====
Every saga lives in one hash, ``<prefix>:{<shard>}:saga:<saga_id>``, next
to its shard's sorted sets of saga ids, all under the hash tag
``{<shard>}`` so each command touches one Redis Cluster slot:

=========== ================================================================
``:due``    sagas with something in flight, scored by its earliest lease
            (the recovery sweep reads it)
``:live``   sagas not finished (running, compensating, waiting for an
            operator), scored by creation time (``compensate list``)
``:sagas``  every stored saga, scored by creation time
``:ends``   finished sagas, scored by when their record expires (the sweep
            trims ``:sagas`` with it)
``:bad``    sagas the sweep could not process, by time (for an operator)
``:sweep``  when the shard was last swept, and until when it is held
=========== ================================================================

plus ``<prefix>:sweeper``, the lock of the one worker that sweeps.

Fields (``i`` a step index, ``k`` a stage index)
===============================================

=========== ================================================================
``id``      the saga id; ``state`` a :class:`~celery_compensate.model.SagaState`
``n/ns``    number of steps / stages; ``qt`` seconds a message may wait
            in the broker before a worker takes it
``created`` when started; ``ended`` when finished (or became
            COMPENSATION_FAILED or FORWARD_FAILED); ``reason`` why it
            compensates or why it failed forward (an undo's errors are its
            ``e<i>``); ``failed`` the failed step; ``pv`` the pivot step
            (``compensate_pivot``), if any;
            ``retries`` operator retries; ``cstart`` compensation began;
            ``tp`` the W3C ``traceparent`` of the span the saga was
            started in (tracing only; absent otherwise)
``kids``    the step indices that are nested sagas (absent: none); the
            child of step ``i`` is the saga ``<id>~<i>``, in the same shard
``up``      in a nested saga: its step index in its parent (the parent's
            id is its own up to the last ``~``); ``ua`` the parent's undo
            attempt it compensates for, once the parent undoes it;
            ``rp``/``rpd`` the token of the report it owes its parent (it
            settled: completed, compensated, or COMPENSATION_FAILED) and
            until when its reporter may take (the sweep reports it after);
            ``rg`` that grace in seconds (a step lease); ``ptk`` its
            parent's ``tok`` (a child left by an earlier saga with the
            parent's id is replaced, not taken for this one's); ``xp``
            its outermost saga ended (it expires when it ends)
``cur``     highest dispatched stage; during compensation the stage whose
            undos are running (``-1`` once every stage is settled)
``g<k>``    comma-separated step indices of stage ``k``
``w<k>``    forward members of stage ``k`` not yet settled
``y<k>``    undos of stage ``k`` not yet done
``late``    undos of late completers run out of order, not yet done
``p<i>``    the step's spec (JSON)
``k<i>``    its stage; ``u<i>`` 0 no undo, 1 undo, 2 undo also on failure
``o<i>``    its lease once held; ``ou<i>`` its undo's; ``c<i>`` countdown
``d<i>``    deadline of what is in flight for step ``i`` (forward task or
            undo); ``h<i>`` the holder (a token of the worker's copy) once
            a worker received it, ``~`` while its nested saga holds it
            (no deadline: the child reports when it settles)
``ob<i>``   ``1`` while the step's message is in the outbox: its stage was
            dispatched by a completion whose publishing is not confirmed
            yet; ``pb<k>`` the step whose completion dispatched stage ``k``;
            ``pg<i>`` the step's publish generation (absent: 1), raised
            each time it is published again; ``fa<i>`` past a pivot, its
            current attempt (absent: 1), ``fb<i>`` the attempts spent
            before an operator's retry, ``tr<i>``/``trd<i>`` the token of
            the call that last published it again and its countdown
``s<i>``    forward state (StepState); ``r<i>`` result JSON; ``t<i>``
            when settled; ``fe<i>`` why it failed
``x<i>``    undo state (UndoState); ``a<i>`` current attempt; ``ab<i>``
            attempts spent before the last operator retry; ``b<i>``
            started; ``z<i>`` undone at; ``e<i>`` last undo error;
            ``l<i>`` ``1`` when it is a late, out-of-order undo; ``rd<i>``
            ``1``: undo again once the running undo ends
tokens      of the call that made a change, so that a resent call (its
            reply lost) answers again: ``tok`` created, ``tk<i>`` settled
            step ``i``, ``dn<k>`` completed stage ``k``, ``claim`` claimed
            compensation, ``fin`` finished the saga, ``cf`` made it
            COMPENSATION_FAILED, ``ff`` made it FORWARD_FAILED, ``rtf``
            retried it forward (``rf<i>``: the steps that retry published
            again), ``tb<i>`` let the running copy of an undo
            in, ``tu<i>`` settled an undo attempt, ``rt`` retried by an
            operator
=========== ================================================================
"""
from __future__ import annotations

import zlib
from typing import Callable

__all__ = (
    'SHARDS', 'shard_of', 'Keys',
    'ID', 'STATE', 'N', 'NS', 'QT', 'CREATED', 'ENDED', 'REASON', 'FAILED',
    'RETRIES', 'CSTART', 'CUR', 'LATE', 'TOKEN', 'CLAIM', 'FIN', 'CF', 'RT',
    'PIVOT', 'FF', 'RTF', 'TRACE_PARENT', 'KIDS', 'UP', 'UNDO_FOR', 'REPORT',
    'REPORT_BY', 'REPORT_GRACE', 'PARENT_TOKEN', 'ROOT_ENDED', 'CHILD_HOLDS', 'forward_attempt',
    'forward_attempts_before', 'forward_retry_token', 'forward_retry_by',
    'forward_retry_delay',
    'members', 'waiting', 'undos_left', 'stage_token', 'publisher',
    'spec', 'stage', 'undo_flag', 'lease', 'undo_lease', 'countdown',
    'deadline', 'held', 'outbox', 'generation', 'step_state', 'result',
    'settled_at', 'failure',
    'undo_state', 'attempt', 'attempts_before', 'undo_started', 'undone_at',
    'undo_error', 'late', 'redo', 'settle_token', 'begin_token', 'undo_token',
    'undone_tokens',
    'STEP_FIELDS', 'STAGE_FIELDS', 'SAGA_FIELDS',
)

#: Shards of the indexes.  Fixed: a saga's keys are found from its id
#: through it.
SHARDS = 64


def shard_of(saga_id: str) -> int:
    """The shard (hash tag) of a saga: stable across processes.  A nested
    saga (``<root>~<i>...``) is in its root's shard, so a command can change
    a parent and its child in one Redis Cluster slot."""
    root = saga_id.partition('~')[0]
    return zlib.crc32(root.encode()) % SHARDS


class Keys:
    """The keys of one store (one ``compensate_key_prefix``).

    Arguments:
        prefix: the key prefix.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _tag(self, shard: int) -> str:
        return f'{self.prefix}:{{{shard:02x}}}'

    def saga(self, saga_id: str) -> str:
        """The saga's hash."""
        return f'{self._tag(shard_of(saga_id))}:saga:{saga_id}'

    def due(self, shard: int) -> str:
        """Saga ids of a shard scored by the earliest lease in flight."""
        return f'{self._tag(shard)}:due'

    def live(self, shard: int) -> str:
        """Unfinished sagas of a shard, scored by creation time."""
        return f'{self._tag(shard)}:live'

    def sagas(self, shard: int) -> str:
        """Every stored saga of a shard, scored by creation time."""
        return f'{self._tag(shard)}:sagas'

    def ends(self, shard: int) -> str:
        """Finished sagas of a shard, scored by when they expire."""
        return f'{self._tag(shard)}:ends'

    def bad(self, shard: int) -> str:
        """Sagas of a shard the sweep could not process, by time."""
        return f'{self._tag(shard)}:bad'

    def sweep(self, shard: int) -> str:
        """When a shard was last swept, and until when it is held."""
        return f'{self._tag(shard)}:sweep'

    def lock(self) -> str:
        """The lock held by the one worker that sweeps."""
        return f'{self.prefix}:sweeper'

    def for_saga(self, saga_id: str) -> list[str]:
        """KEYS[1-5] of every command that changes a saga: its hash,
        ``:due``, ``:live``, ``:ends`` and ``:sagas`` of its shard."""
        shard = shard_of(saga_id)
        return [self.saga(saga_id), self.due(shard), self.live(shard),
                self.ends(shard), self.sagas(shard)]

    def for_shard(self, shard: int) -> list[str]:
        """KEYS[1-4] of the scan command: ``:due``, ``:sweep``, ``:sagas``
        and ``:ends`` of a shard."""
        return [self.due(shard), self.sweep(shard), self.sagas(shard),
                self.ends(shard)]


# -- saga fields -------------------------------------------------------
ID = 'id'
STATE = 'state'
N = 'n'
NS = 'ns'
QT = 'qt'
CREATED = 'created'
ENDED = 'ended'
REASON = 'reason'
FAILED = 'failed'
RETRIES = 'retries'
CSTART = 'cstart'
CUR = 'cur'
LATE = 'late'
TOKEN = 'tok'
CLAIM = 'claim'
FIN = 'fin'
CF = 'cf'
RT = 'rt'
PIVOT = 'pv'
FF = 'ff'
RTF = 'rtf'
TRACE_PARENT = 'tp'
KIDS = 'kids'
UP = 'up'
UNDO_FOR = 'ua'
REPORT = 'rp'
REPORT_BY = 'rpd'
REPORT_GRACE = 'rg'
PARENT_TOKEN = 'ptk'
ROOT_ENDED = 'xp'
#: ``h<i>`` of a step (or undo) a nested saga holds
CHILD_HOLDS = '~'

SAGA_FIELDS = (ID, STATE, N, NS, QT, CREATED, ENDED, REASON, FAILED,
               RETRIES, CSTART, CUR, LATE, TOKEN, CLAIM, FIN, CF, RT, PIVOT,
               FF, RTF, TRACE_PARENT, KIDS, UP, UNDO_FOR, REPORT, REPORT_BY,
               REPORT_GRACE, PARENT_TOKEN, ROOT_ENDED)

# -- stage fields: the prefix, then the stage index -------------------------


def members(k: int) -> str:
    """Comma-separated step indices of stage ``k``."""
    return f'g{k}'


def waiting(k: int) -> str:
    """Forward members of stage ``k`` not yet settled."""
    return f'w{k}'


def undos_left(k: int) -> str:
    """Undos of stage ``k`` not yet done."""
    return f'y{k}'


def stage_token(k: int) -> str:
    """Token of the call that completed stage ``k``."""
    return f'dn{k}'


def publisher(k: int) -> str:
    """The step whose completion dispatched stage ``k`` (its worker
    confirms the publishing)."""
    return f'pb{k}'


# -- step fields: the prefix, then the step index ----------------------------


def spec(i: int) -> str:
    """The step's spec (JSON)."""
    return f'p{i}'


def stage(i: int) -> str:
    """The step's stage index."""
    return f'k{i}'


def undo_flag(i: int) -> str:
    """``0`` no undo, ``1`` undo, ``2`` undo also on the step's failure."""
    return f'u{i}'


def lease(i: int) -> str:
    """Seconds the step may go unrenewed once a worker holds it."""
    return f'o{i}'


def undo_lease(i: int) -> str:
    """The same for its undo."""
    return f'ou{i}'


def countdown(i: int) -> str:
    """Seconds the step waits in the broker by design (countdown, eta)."""
    return f'c{i}'


def deadline(i: int) -> str:
    """Deadline of what is in flight for the step (forward task or undo)."""
    return f'd{i}'


def held(i: int) -> str:
    """The holder (a token of one worker's copy) once a worker received
    what is in flight."""
    return f'h{i}'


def outbox(i: int) -> str:
    """``1`` while the step's message may not be published yet."""
    return f'ob{i}'


def generation(i: int) -> str:
    """How many times the step was published (absent: once)."""
    return f'pg{i}'


def forward_attempt(i: int) -> str:
    """After a completed pivot: the step's current attempt (absent: the
    first); each failure past the pivot publishes it again."""
    return f'fa{i}'


def forward_attempts_before(i: int) -> str:
    """Forward attempts spent before the operator's last retry."""
    return f'fb{i}'


def forward_retry_token(i: int) -> str:
    """Token of the operator's retry that published the step again."""
    return f'rf{i}'


def forward_retry_by(i: int) -> str:
    """Token of the call that last published the step again past the
    pivot (a resent call answers the same)."""
    return f'tr{i}'


def forward_retry_delay(i: int) -> str:
    """The countdown that copy was published with."""
    return f'trd{i}'


def step_state(i: int) -> str:
    """Forward state (:class:`~celery_compensate.model.StepState` code)."""
    return f's{i}'


def result(i: int) -> str:
    """The step's result (JSON)."""
    return f'r{i}'


def settled_at(i: int) -> str:
    """When the step settled (completed or failed)."""
    return f't{i}'


def failure(i: int) -> str:
    """Why the step failed."""
    return f'fe{i}'


def undo_state(i: int) -> str:
    """Undo state (:class:`~celery_compensate.model.UndoState` code)."""
    return f'x{i}'


def attempt(i: int) -> str:
    """The current undo attempt."""
    return f'a{i}'


def attempts_before(i: int) -> str:
    """Undo attempts spent before the last operator retry."""
    return f'ab{i}'


def undo_started(i: int) -> str:
    """When the current undo attempt began."""
    return f'b{i}'


def undone_at(i: int) -> str:
    """When the undo succeeded."""
    return f'z{i}'


def undo_error(i: int) -> str:
    """The last undo error."""
    return f'e{i}'


def late(i: int) -> str:
    """``1`` when the undo is a late, out-of-order one."""
    return f'l{i}'


def redo(i: int) -> str:
    """``1``: undo again once the running undo ends."""
    return f'rd{i}'


def settle_token(i: int) -> str:
    """Token of the call that settled the step."""
    return f'tk{i}'


def begin_token(i: int) -> str:
    """Token of the call that let the running undo copy in."""
    return f'tb{i}'


def undo_token(i: int) -> str:
    """Token of the call that settled an undo attempt."""
    return f'tu{i}'


def undone_tokens(i: int) -> str:
    """A nested saga's step: the report tokens that recorded its undo done
    before its late failure turned it back (space-separated): a resend of
    one of them is stale."""
    return f'ot{i}'


def _prefixes(*fields: Callable[[int], str]) -> dict[str, str]:
    """Each field function's name and the prefix it spells (for checks
    that scan the Lua commands)."""
    return {fn.__name__: fn(0)[:-1] for fn in fields}


#: the prefix of every per-stage field, by function name
STAGE_FIELDS = _prefixes(members, waiting, undos_left, stage_token,
                         publisher)

#: the prefix of every per-step field, by function name
STEP_FIELDS = _prefixes(
    spec, stage, undo_flag, lease, undo_lease, countdown, deadline, held,
    outbox, generation, forward_attempt, forward_attempts_before,
    forward_retry_token, forward_retry_by, forward_retry_delay, step_state,
    result, settled_at, failure,
    undo_state, attempt, attempts_before, undo_started, undone_at,
    undo_error, late, redo, settle_token, begin_token, undo_token,
    undone_tokens)
