"""The app of the prefork worker subprocess started by test_prefork.py."""
from __future__ import annotations

import os

from celery import Celery

from celery_compensate import install

# a result backend, so a child lost after storing SUCCESS takes Celery's
# silent "succeeded before the worker was lost" path
app = Celery('prefork_tests', broker=os.environ['COMPENSATE_TEST_BROKER'],
             backend=os.environ['COMPENSATE_TEST_BROKER'])
app.conf.update(
    compensate_key_prefix=os.environ['COMPENSATE_TEST_PREFIX'],
    task_default_queue=os.environ['COMPENSATE_TEST_QUEUE'],
    compensate_undo_retry_backoff=0.05,
    compensate_undo_retry_backoff_max=0.2,
    broker_connection_retry_on_startup=True,
)
for name in ('step_timeout', 'queue_timeout', 'heartbeat_interval',
             'recovery_interval', 'undo_retry_backoff',
             'undo_retry_backoff_max', 'record_retry_timeout',
             'redis_socket_timeout'):
    value = os.environ.get(f'COMPENSATE_TEST_{name.upper()}')
    if value:
        app.conf[f'compensate_{name}'] = float(value)
if os.environ.get('COMPENSATE_TEST_FORWARD_MAX_ATTEMPTS'):
    app.conf.compensate_forward_max_attempts = int(
        os.environ['COMPENSATE_TEST_FORWARD_MAX_ATTEMPTS'])
if os.environ.get('COMPENSATE_TEST_UNDO_MAX_ATTEMPTS'):
    app.conf.compensate_undo_max_attempts = int(
        os.environ['COMPENSATE_TEST_UNDO_MAX_ATTEMPTS'])
if os.environ.get('COMPENSATE_TEST_STORE_URL'):
    # the saga store in a Redis of its own (the broker elsewhere)
    app.conf.compensate_redis_url = os.environ['COMPENSATE_TEST_STORE_URL']
if os.environ.get('COMPENSATE_TEST_UNDO_QUEUE'):
    app.conf.compensate_undo_queue = os.environ['COMPENSATE_TEST_UNDO_QUEUE']
if os.environ.get('COMPENSATE_TEST_VISIBILITY'):
    app.conf.broker_transport_options = {
        'visibility_timeout': float(os.environ['COMPENSATE_TEST_VISIBILITY'])}
if os.environ.get('COMPENSATE_TEST_REJECT_ON_WORKER_LOST'):
    app.conf.task_acks_late = True
    app.conf.task_reject_on_worker_lost = True
if os.environ.get('COMPENSATE_TEST_TRACES'):
    # an in-memory exporter sees only its own process: spans go to a file
    from tests.spans import export_to_file
    export_to_file(os.environ['COMPENSATE_TEST_TRACES'])
    app.conf.compensate_tracing = True
install(app)

from tests import tasks  # noqa: E402,F401  (registers the shared tasks)


# -- faults placed between two of the library's own actions ----------------

from celery import signals  # noqa: E402

from celery_compensate.messages import SAGA_ID, STEP  # noqa: E402
from tests.tasks import kill_on_publish_key  # noqa: E402


@signals.before_task_publish.connect
def _kill_on_publish(headers=None, **_):
    headers = headers or {}
    if headers.get(SAGA_ID) is None:
        return
    import redis as _redis
    rds = _redis.Redis.from_url(os.environ['COMPENSATE_TEST_BROKER'],
                                decode_responses=True)
    key = kill_on_publish_key(os.environ['COMPENSATE_TEST_PREFIX'])
    want = rds.get(key)
    if not want:
        return
    saga_id, step, mode = want.rsplit(':', 2)
    # ``<i>`` a forward step, ``u<i>`` the undo of step i
    which = (f'u{headers[STEP]}' if headers.get('compensate_attempt')
             else str(headers[STEP]))
    if headers[SAGA_ID] != saga_id or which != step:
        return
    if rds.delete(key):
        import signal as _signal
        if mode == 'worker':
            os.kill(os.getppid(), _signal.SIGKILL)
        os.kill(os.getpid(), _signal.SIGKILL)
