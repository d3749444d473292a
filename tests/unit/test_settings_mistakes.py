"""Settings that catch mistakes: a misspelt key, a change after install(),
and Django's ``CELERY_`` namespace (no Redis needed: nothing connects)."""
from __future__ import annotations

import warnings

import pytest
from celery import Celery

from celery_compensate import SagaStoreUnavailable, install, saga
from celery_compensate.appstate import get_state
from celery_compensate.settings import SettingWarning


def _app(**conf):
    app = Celery('mistakes', broker='redis://127.0.0.1:1/0',
                 set_as_current=False)
    app.conf.update(**conf)
    return app


def test_a_misspelt_setting_is_warned_with_a_suggestion():
    app = _app(compensate_undo_max_atempts=3, compensate_step_timeout=6)
    with pytest.warns(SettingWarning) as caught:
        install(app)
    assert [str(w.message) for w in caught] == [
        'compensate_undo_max_atempts is not a celery_compensate setting: '
        'did you mean compensate_undo_max_attempts?']
    app.close()


def test_a_namespaced_misspelling_is_warned_too():
    class DjangoSettings:
        CELERY_BROKER_URL = 'redis://127.0.0.1:1/0'
        CELERY_COMPENSATE_STEP_TIMEOUT = 6
        CELERY_COMPENSATE_QUEUE_TIMOUT = 60
        DEBUG = True
    app = Celery('django', set_as_current=False)
    app.config_from_object(DjangoSettings, namespace='CELERY')
    with pytest.warns(SettingWarning, match=(
            'CELERY_COMPENSATE_QUEUE_TIMOUT is not a celery_compensate '
            'setting: did you mean compensate_queue_timeout')):
        state = install(app)
    # the namespaced settings are read
    assert state.settings.step_timeout == 6
    assert state.settings.redis_url == 'redis://127.0.0.1:1/0'
    app.close()


def test_correct_settings_warn_nothing():
    app = _app(compensate_step_timeout=6, compensate_undo_max_attempts=4)
    with warnings.catch_warnings():
        warnings.simplefilter('error', SettingWarning)
        install(app)
        get_state(app).check_conf(every=0)
    app.close()


def test_a_change_after_install_is_warned_once():
    app = _app(compensate_step_timeout=6)
    state = install(app)
    app.conf.compensate_step_timeout = 60
    with pytest.warns(SettingWarning, match=(
            r'compensate_step_timeout was changed after install\(app\): '
            'the change is ignored')):
        state.check_conf(every=0)
    assert state.settings.step_timeout == 6
    with warnings.catch_warnings():
        warnings.simplefilter('error', SettingWarning)
        state.check_conf(every=0)               # told once
    app.close()


def test_a_saga_start_looks_for_changed_settings():
    app = _app(compensate_step_timeout=6)
    install(app)

    @app.task(name='m.undo')
    def undo(result):
        pass

    @app.task(name='m.step', compensate_with='m.undo')
    def step():
        pass

    app.conf.compensate_queue_timeout = 5
    with pytest.warns(SettingWarning, match='compensate_queue_timeout'):
        with pytest.raises(SagaStoreUnavailable):     # no Redis here
            saga(step.si(), app=app).apply_async()
    app.close()
