from celery_compensate import SagaState, saga

from . import tasks


def test_three_steps_complete(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'), tasks.do.si('b'), tasks.do.si('c')).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPLETED


def test_last_fails(celery_app, celery_worker, rds):
    res = saga(tasks.do.si('a'), tasks.do.si('b'), tasks.do.si('c', fail=True)).apply_async()
    assert res.wait(timeout=10) is SagaState.COMPENSATED
    print(rds.lrange(f"{celery_app.conf.compensate_key_prefix}:ledger:{res.id}", 0, -1))
