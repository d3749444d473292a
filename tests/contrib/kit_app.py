"""A user's app, as a user writes it: configured and installed at import,
with a broker the tests never reach (the kit must point it at the test
Redis)."""
from __future__ import annotations

from celery import Celery, Task

from celery_compensate import install

app = Celery('kit', broker='redis://127.0.0.1:1/0')
app.conf.update(compensate_key_prefix='kit-app', task_default_queue='kit',
                broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False,
                compensate_undo_max_attempts=3)
install(app)


@app.task
def release(reservation: str, order: int, qty: int) -> None:
    pass


@app.task(compensate_with=release)
def reserve(order: int, qty: int) -> str:
    return f'res-{order}'


@app.task
def refund(payment: str, reservation: str, order: int) -> None:
    pass


@app.task(compensate_with=refund)
def charge(reservation: str, order: int) -> str:
    return f'pay-{order}'


@app.task
def cancel_courier(booking: str, order: int) -> None:
    pass


@app.task(compensate_with=cancel_courier)
def book_courier(order: int) -> str:
    return f'ship-{order}'


@app.task
def void_invoice(invoice: str, order: int) -> None:
    pass


@app.task(compensate_with=void_invoice)
def issue_invoice(order: int) -> str:
    return f'inv-{order}'


@app.task
def notify(booked: list, order: int) -> str:
    return f'mailed {order}'


@app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=3,
          default_retry_delay=0)
def flaky_lookup(self: Task, order: int) -> int:
    return order * 10


@app.task(name='billing.audit')
def billing_audit(order: int) -> None:
    """Two tasks called ``audit``: the short name is ambiguous."""


@app.task(name='stock.audit')
def stock_audit(order: int) -> None:
    pass
