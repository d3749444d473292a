"""Integrations with other tools: :mod:`celery_compensate.contrib.pytest`
(a test kit for your own sagas)."""
