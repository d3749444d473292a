"""A user's app, as a user writes it: configured and installed at import,
with a broker the tests never reach (the kit must point it at the test
Redis)."""
from __future__ import annotations

from celery import Celery, Task

from celery_compensate import install

app = Celery('kit', broker='redis://127.0.0.1:1/0')
# shared=False: not bound to the other apps of the test session (the
# shop's has tasks of the same short names)
app.conf.update(compensate_key_prefix='kit-app', task_default_queue='kit',
                broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False,
                compensate_undo_max_attempts=3)
install(app)


@app.task(shared=False)
def release(reservation: str, order: int, qty: int) -> None:
    pass


@app.task(compensate_with=release, shared=False)
def reserve(order: int, qty: int) -> str:
    return f'res-{order}'


@app.task(shared=False)
def refund(payment: str, reservation: str, order: int) -> None:
    pass


@app.task(compensate_with=refund, shared=False)
def charge(reservation: str, order: int) -> str:
    return f'pay-{order}'


@app.task(shared=False)
def unbook(booking: str, order: int) -> None:
    pass


@app.task(compensate_with=unbook, shared=False)
def book(order: int) -> str:
    return f'ship-{order}'


@app.task(shared=False)
def void(invoice: str, order: int) -> None:
    pass


@app.task(compensate_with=void, shared=False)
def invoice(order: int) -> str:
    return f'inv-{order}'


@app.task(shared=False)
def mail(booked: list, order: int) -> str:
    return f'mailed {order}'


@app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=3,
          default_retry_delay=0, shared=False)
def flaky_lookup(self: Task, order: int) -> int:
    return order * 10


@app.task(name='billing.audit', shared=False)
def billing_audit(order: int) -> None:
    """Two tasks called ``audit``: the short name is ambiguous."""


@app.task(name='stock.audit', shared=False)
def stock_audit(order: int) -> None:
    pass
