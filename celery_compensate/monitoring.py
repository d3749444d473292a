"""What monitors see of sagas: task messages and task events.

Flower 2.x shows only ``task-*`` events and displays and searches the
``argsrepr``/``kwargsrepr`` a task message carries, never our custom
headers.  So, without changing any task signature:

- every saga step and undo message gets a ``kwargsrepr`` that starts with
  the saga identity, as a Python-literal dict::

      {'compensate_saga_id': '<id>', 'compensate_step': 2, 'amount': 40}
      {'compensate_saga_id': '<id>', 'compensate_step': 1,
       'compensate_attempt': 3, 'amount': 40}

  Searching the saga id in Flower (or ``kwargs:compensate_saga_id=<id>``)
  lists all of a saga's tasks.  The saga keys come first so that no
  1,024-character cut removes them.  A ``kwargsrepr`` the caller set
  (to hide secrets) is kept: the saga keys are put in front of it and the
  real kwargs are never shown.  The coordinator sets it when it publishes
  (so Celery computes no repr of its own), and ``before_task_publish``
  labels what Celery publishes again (retries of a step or undo).
- when a saga becomes ``COMPENSATION_FAILED``, a worker that sends task
  events (``-E``) sends a ``task-compensation_failed`` event for the undo
  attempt that failed last (its task id and name), which Flower counts in
  ``flower_events_total{type="task-compensation_failed", task=<undo>}``.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping

from celery import signals as celery_signals
from celery.utils.log import get_logger

from . import signals
from .appstate import find_state
from .messages import IDENTITY, SAGA_ID, is_labelled, label_kwargs
from .model import UndoState

if TYPE_CHECKING:
    from celery import Celery

__all__ = ('COMPENSATION_FAILED_EVENT', 'FORWARD_FAILED_EVENT',
           'send_compensation_failed', 'send_forward_failed',
           'connect_events')

logger = get_logger(__name__)

#: Type of the event sent when a saga becomes ``COMPENSATION_FAILED``.
COMPENSATION_FAILED_EVENT = 'task-compensation_failed'

#: Type of the event sent when a saga becomes ``FORWARD_FAILED``.
FORWARD_FAILED_EVENT = 'task-forward_failed'

#: Longest wait for the event to be sent; the rest happens in the
#: background (a failed compensation must not stall a worker).
SEND_TIMEOUT = 2.0

# a kombu retry policy, typed as Dispatcher.send takes it
_RETRY_POLICY: dict[str, Any] = {
    'max_retries': 2, 'interval_start': 0, 'interval_step': 0.2,
    'interval_max': 0.5}


def send_compensation_failed(
        app: Celery, saga_id: str, step: int | None, error: Any,
        hostname: str | None = None,
        timeout: float = SEND_TIMEOUT) -> threading.Thread:
    """Send a ``task-compensation_failed`` event for ``saga_id``.

    The event names the undo attempt that failed last (``uuid``
    ``<saga>.u<step>.<attempt>``, ``name`` the undo task), read from the
    saga's record, plus ``saga_id``, ``step``, ``attempt`` and ``error``.
    It is sent from a thread, waited for at most ``timeout`` seconds;
    failures are logged, never raised.

    Arguments:
        step: the step whose undo failed; ``None``: the step whose undo is
            recorded failed.
        hostname: the sending worker's node name.

    Returns:
        threading.Thread: the sending thread.
    """
    return _send(app, COMPENSATION_FAILED_EVENT, saga_id,
                 lambda: _failed_undo(app, saga_id, step), error, hostname,
                 timeout)


def send_forward_failed(
        app: Celery, saga_id: str, step: int | None, error: Any,
        hostname: str | None = None,
        timeout: float = SEND_TIMEOUT) -> threading.Thread:
    """Send a ``task-forward_failed`` event for ``saga_id``: its step
    past the pivot spent its attempts.  The event names that step's task
    (``uuid`` ``<saga>.s<step>``, ``name``), plus ``saga_id``, ``step``
    and ``error``; sent as :func:`send_compensation_failed` sends.

    Returns:
        threading.Thread: the sending thread.
    """
    return _send(app, FORWARD_FAILED_EVENT, saga_id,
                 lambda: _failed_step(app, saga_id, step), error, hostname,
                 timeout)


def _send(app: Celery, event: str, saga_id: str,
          describe: Callable[[], dict[str, Any]], error: Any,
          hostname: str | None, timeout: float) -> threading.Thread:
    thread = threading.Thread(
        target=_send_event,
        args=(app, event, saga_id, describe, error, hostname), daemon=True,
        name='compensate-event')
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning('saga %s: the %s event is not sent yet after %.1fs; '
                       'it is sent in the background', saga_id, event,
                       timeout)
    return thread


def _send_event(app: Celery, event: str, saga_id: str,
                describe: Callable[[], dict[str, Any]], error: Any,
                hostname: str | None) -> None:
    try:
        fields = describe()
        fields.update(saga_id=saga_id,
                      error=None if error is None else str(error)[:2000])
        with app.connection_for_write() as conn:
            # kombu would otherwise wait for the broker forever (the stubs
            # type the intervals as int; kombu takes float seconds)
            conn.ensure_connection(
                max_retries=_RETRY_POLICY['max_retries'], interval_start=0,
                interval_step=0.2,  # type: ignore[arg-type]
                interval_max=0.5)  # type: ignore[arg-type]
            dispatcher = app.events.Dispatcher(
                conn, hostname=hostname, enabled=True,
                buffer_while_offline=False)
            try:
                dispatcher.send(event, retry=True,
                                retry_policy=_RETRY_POLICY, **fields)
            finally:
                dispatcher.close()
    except Exception as exc:  # noqa: BLE001 - monitoring only
        logger.warning('saga %s: could not send the %s event: %r', saga_id,
                       event, exc)


def _failed_step(app: Celery, saga_id: str,
                 step: int | None) -> dict[str, Any]:
    """``uuid``, ``name`` and ``step`` of the forward step that failed
    (the saga id as ``uuid`` if the record cannot tell)."""
    from .appstate import get_state
    try:
        record = get_state(app).store.read(saga_id)
    except Exception as exc:  # noqa: BLE001
        logger.warning('saga %s: cannot read the record for the %s event: %r',
                       saga_id, FORWARD_FAILED_EVENT, exc)
        return {'uuid': saga_id, 'step': step}
    if step is None or not 0 <= step < len(record.steps):
        return {'uuid': saga_id, 'step': step}
    return {'uuid': record.steps[step].task_id,
            'name': record.steps[step].task_name, 'step': step}


def _failed_undo(app: Celery, saga_id: str,
                 step: int | None) -> dict[str, Any]:
    """``uuid``, ``name``, ``step`` and ``attempt`` of the undo attempt that
    failed last (the saga id as ``uuid`` if the record cannot tell)."""
    from .appstate import get_state
    try:
        steps = get_state(app).store.read(saga_id).steps
    except Exception as exc:  # noqa: BLE001
        logger.warning('saga %s: cannot read the record for the %s event: %r',
                       saga_id, COMPENSATION_FAILED_EVENT, exc)
        return {'uuid': saga_id, 'step': step}
    if step is None:
        step = next((s.index for s in reversed(steps)
                     if s.undo_state is UndoState.FAILED), None)
    record = (steps[step] if step is not None and 0 <= step < len(steps)
              else None)
    if record is None or not record.undo_attempts:
        return {'uuid': saga_id, 'step': step,
                'name': record.undo_name if record else None}
    return {'uuid': record.undo_task_id,
            'name': record.undo_name, 'step': step,
            'attempt': record.undo_attempts}


def connect_events(app: Celery) -> tuple[Callable[..., None], ...]:
    """Connect the handlers that label ``app``'s saga messages and send
    its ``task-compensation_failed`` events.

    Returns:
        tuple: the handlers.  They are connected weakly: the caller keeps
        them alive as long as the app.
    """
    uid = f'celery_compensate.monitoring.{id(app)}'

    def on_before_publish(sender: Any = None, body: Any = None,
                          headers: dict[str, Any] | None = None,
                          **_: Any) -> None:
        # the coordinator labels what it publishes; this catches what Celery
        # publishes again for a saga task (self.retry(), autoretry_for),
        # which gets a kwargsrepr of the real kwargs.  The signal does not
        # say which app publishes: the first installed app labels it.
        if (not headers or SAGA_ID not in headers
                or is_labelled(headers.get('kwargsrepr'))):
            return
        try:
            if not (isinstance(body, (tuple, list)) and len(body) == 3
                    and isinstance(body[1], Mapping)):
                return  # task protocol 1: no kwargsrepr to set
            identity = {k: headers[k] for k in IDENTITY if k in headers}
            headers['kwargsrepr'] = label_kwargs(
                identity, body[1],
                maxlevels=app.conf.get('task_repr_maxlevels', 3))
        except Exception:  # noqa: BLE001 - must not stop the publish
            logger.warning('celery_compensate: could not label message %s '
                           'for monitors', headers.get('id'), exc_info=True)

    def sender_of(event: str, send: Callable[..., Any]
                  ) -> Callable[..., None]:
        def on_failed(sender: Any = None, saga_id: str | None = None,
                      step: int | None = None, error: Any = None,
                      **_: Any) -> None:
            if sender is not app or not saga_id:
                return
            state = find_state(app)
            if state is None or not (state.task_events
                                     or app.conf.worker_send_task_events):
                return
            try:
                send(app, saga_id, step, error, hostname=state.hostname)
            except Exception:  # noqa: BLE001 - e.g. no thread started
                logger.warning('saga %s: could not send the %s event',
                               saga_id, event, exc_info=True)
        return on_failed

    # looked up when called: tests replace the module's senders
    on_compensation_failed = sender_of(
        COMPENSATION_FAILED_EVENT,
        lambda *a, **kw: send_compensation_failed(*a, **kw))
    on_forward_failed = sender_of(
        FORWARD_FAILED_EVENT, lambda *a, **kw: send_forward_failed(*a, **kw))

    celery_signals.before_task_publish.connect(
        on_before_publish, dispatch_uid=f'{uid}.on_before_publish')
    signals.compensation_failed.connect(
        on_compensation_failed, dispatch_uid=f'{uid}.on_compensation_failed')
    signals.saga_forward_failed.connect(
        on_forward_failed, dispatch_uid=f'{uid}.on_forward_failed')
    return on_before_publish, on_compensation_failed, on_forward_failed
