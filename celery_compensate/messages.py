"""What a saga task message carries besides its arguments: its headers and
the ``kwargsrepr`` monitors show.

Pure helpers (no Redis, no app), so the coordinator that publishes and the
monitoring hooks that relabel Celery's own re-publishes share one spelling.
"""
from __future__ import annotations

from typing import Any, Mapping

from celery.utils.saferepr import saferepr

__all__ = ('SAGA_ID', 'STEP', 'ATTEMPT', 'DEADLINE', 'GENERATION',
           'OUTBOX_UNTIL', 'UNSTORED_RESULT', 'unstored',
           'IDEMPOTENCY_KEY', 'TRACE_PARENT',
           'IDENTITY', 'KWARGSREPR_MAXSIZE', 'identity', 'label_kwargs',
           'is_labelled')

#: Header names (also the keys of the identity shown in ``kwargsrepr``).
SAGA_ID = 'compensate_saga_id'
STEP = 'compensate_step'
ATTEMPT = 'compensate_attempt'             #: undos only
#: forward steps only: past this time the sweep may have given the step up,
#: so the worker checks the record before running the body
DEADLINE = 'compensate_deadline'
#: forward steps the sweep published again: the publish generation (absent
#: on a first publish); a worker refuses a copy older than the record's
GENERATION = 'compensate_generation'
#: forward steps of a stage dispatched by a completion: until this time the
#: sweep cannot have published the step again (its outbox lease runs), so a
#: worker receiving it later checks the record before the body may run
OUTBOX_UNTIL = 'compensate_outbox_until'
IDEMPOTENCY_KEY = 'compensate_idempotency_key'   #: undos only
#: with tracing on, of a saga started inside a span: that span's W3C
#: ``traceparent``, so the worker's spans join its trace
TRACE_PARENT = 'compensate_trace_parent'

#: The key of the placeholder an undo gets as the result of a step whose
#: result could not be stored (not JSON, or over
#: ``compensate_result_max_bytes``): ``{UNSTORED_RESULT: "<why>"}``.
UNSTORED_RESULT = 'compensate_result_unstored'

#: The identity headers, in the order ``kwargsrepr`` shows them.
IDENTITY = (SAGA_ID, STEP, ATTEMPT)

#: Longest ``kwargsrepr`` written for real kwargs (as ``celery/app/amqp.py``).
KWARGSREPR_MAXSIZE = 1024

_LABEL = '{' + repr(SAGA_ID) + ': '


def identity(saga_id: str, step: int,
             attempt: int | None = None) -> dict[str, Any]:
    """The identity headers of a step (``attempt`` None) or an undo."""
    ident: dict[str, Any] = {SAGA_ID: saga_id, STEP: step}
    if attempt is not None:
        ident[ATTEMPT] = attempt
    return ident


def label_kwargs(identity: Mapping[str, Any], kwargs: Mapping[str, Any],
                 theirs: str | None = None, maxlevels: int = 3) -> str:
    """The ``kwargsrepr`` of a saga message: the saga identity first, then
    the kwargs, or the caller's own ``kwargsrepr`` (which may hide
    secrets: the real kwargs are then never shown).

    Arguments:
        identity: ``compensate_saga_id``, ``compensate_step`` and, for an
            undo, ``compensate_attempt`` (in that order).
        kwargs: the message's real keyword arguments.
        theirs: a ``kwargsrepr`` the caller set.
        maxlevels: ``task_repr_maxlevels``.
    """
    # the identity is a str and ints: written out, not through saferepr
    prefix = '{' + ', '.join(f'{k!r}: {v!r}' for k, v in identity.items())
    if theirs is None:
        rest = {k: v for k, v in kwargs.items() if k not in identity}
        text = saferepr(rest, max(KWARGSREPR_MAXSIZE - len(prefix), 64),
                        maxlevels=maxlevels) if rest else '{}'
    else:
        text = str(theirs).strip()
        if not (text.startswith('{') and text.endswith('}')):
            text = '{' + f"'kwargsrepr': {text!r}" + '}'
    inner = text[1:-1].strip()
    return f'{prefix}, {inner}}}' if inner else f'{prefix}}}'


def is_labelled(kwargsrepr: Any) -> bool:
    """Whether a ``kwargsrepr`` already starts with the saga identity."""
    return isinstance(kwargsrepr, str) and kwargsrepr.startswith(_LABEL)


def unstored(why: str) -> dict[str, str]:
    """The placeholder result of a step whose result could not be stored."""
    return {UNSTORED_RESULT: why}
