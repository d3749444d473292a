"""Every status a store command answers with.

A command's reply starts with one of these (see the header of each file in
``lua/``); Python compares against the enum, never against a string.
"""
from __future__ import annotations

import enum

__all__ = ('Reply', 'CORRUPT')

#: Prefix of the error a command raises when the record lacks what it needs
#: (``redis.error_reply('CORRUPT ...')``): the store turns it into
#: :exc:`~celery_compensate.exceptions.CorruptSagaRecord`.
CORRUPT = 'CORRUPT'


class Reply(str, enum.Enum):
    """What a store command did."""

    # start
    CREATED = 'created'             #: the saga is stored (or the call was resent)
    EXISTS = 'exists'               #: a saga with this id exists already
    ORPHAN = 'orphan'               #: a nested saga's parent no longer waits for it
    BUSY = 'busy'                   #: a leftover child with that id is still at work
    # forward steps: step_done, step_failed
    RECORDED = 'recorded'           #: completed; its stage still runs
    NEXT = 'next'                   #: completed its stage: publish the next one
    COMPLETED = 'completed'         #: completed the saga
    LATE = 'late'                   #: completed after compensation began: undone
    CLAIMED = 'claimed'             #: the first failure: compensation claimed
    JOINED = 'joined'               #: a failure recorded while compensating
    COMPLETED_STEP = 'completed-step'   #: a failure of a step recorded done
    NOT_DISPATCHED = 'not-dispatched'   #: a step whose stage never started
    FORWARD_RETRY = 'forward-retry'     #: past the pivot: published again
    FORWARD_FAILED = 'forward-failed'   #: past the pivot: attempts spent
    STALE_COPY = 'stale-copy'       #: the failure of an older copy: ignored
    UNKNOWN_STEP = 'unknown-step'   #: the saga has no such step
    # an undo attempt: undo_begin, undo_release, undo_done, undo_failed
    RUN = 'run'                     #: this copy may run the undo
    RUNNING = 'running'             #: another copy of the attempt runs
    DONE = 'done'                   #: the undo is done already
    NOT_DUE = 'not-due'             #: the undo is not due
    STALE = 'stale'                 #: not the current attempt
    FAILED = 'failed'               #: the undo spent its attempts
    RELEASED = 'released'           #: the running copy stopped; the retry may run
    NOT_HELD = 'not-held'           #: no copy of that begin runs
    UNDONE = 'undone'               #: the undo succeeded
    RETRY = 'retry'                 #: the attempt failed; the next one is due
    IGNORED = 'ignored'             #: the undo is not in flight
    # leases and recovery: receive, release, confirm, renew, recover
    HELD = 'held'                   #: a worker received it: run it
    GIVEN_UP = 'given-up'           #: the step was given up: refuse the copy
    CONFIRMED = 'confirmed'         #: what a completion dispatched was published
    RENEWED = 'renewed'             #: the lease was extended
    GONE = 'gone'                   #: nothing of that is in flight any more
    RECOVERED = 'recovered'         #: lapsed leases were acted on
    INACTIVE = 'inactive'           #: the saga is not running or compensating
    STUCK = 'stuck'                 #: nothing in flight, yet not settled
    # operators: abort, retry
    ABORTED = 'aborted'             #: compensation claimed by an abort
    NOT_RUNNING = 'not-running'     #: only a running saga can be aborted
    RETRIED = 'retried'             #: failed undos (or forward steps) sent again
    WRONG_STATE = 'wrong-state'     #: only a saga that waits for an operator retries
    PAST_PIVOT = 'past-pivot'       #: the pivot completed: nothing can be aborted
    # nested sagas: unwind, recover, reported
    UNWINDING = 'unwinding'         #: the completed child compensates as a unit
    REDRIVEN = 'redriven'           #: the COMPENSATION_FAILED child compensates again
    WAITING = 'waiting'             #: the child compensates already
    REPORT = 'report'               #: the child settled: report it to its parent
    REPORTED = 'reported'           #: the child's report reached its parent
    # forget
    FORGOTTEN = 'forgotten'         #: the record and its index entries are gone
    NOT_FINISHED = 'not-finished'   #: only a finished saga can be forgotten
    # any command
    DUPLICATE = 'duplicate'         #: another call settled this already
    REPLAYED = 'replayed'           #: this call was resent: the same answer
    MISSING = 'missing'             #: no such saga (expired, never started)

    def __str__(self) -> str:
        return self.value
