"""The prefork tests' app as most projects write it: its tasks named in
``include=`` (imported by a worker or the ``compensate`` command, not by
this module); ``COMPENSATE_TEST_NO_TASKS=1`` leaves them out."""
from __future__ import annotations

import os

from celery import Celery

from celery_compensate import install

app = Celery('include_tests', broker=os.environ['COMPENSATE_TEST_BROKER'],
             include=[] if os.environ.get('COMPENSATE_TEST_NO_TASKS')
             else ['tests.tasks'])
app.conf.update(
    compensate_key_prefix=os.environ['COMPENSATE_TEST_PREFIX'],
    task_default_queue=os.environ['COMPENSATE_TEST_QUEUE'],
    compensate_undo_max_attempts=int(
        os.environ.get('COMPENSATE_TEST_UNDO_MAX_ATTEMPTS', 6)),
)
install(app)
