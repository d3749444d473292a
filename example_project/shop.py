"""A small order service: reserve stock, charge payment, then (in
parallel) book shipment and issue the invoice, then notify the customer.

Every forward task changes real state in Redis (stock counts, balances,
courier slots) and every undo puts it back, so the demo can show that after
compensation the books balance.  Undos use the idempotency key
celery_compensate puts in their request headers, so a repeated undo
changes nothing twice.
"""
from __future__ import annotations

import os
import uuid

import redis
from celery import Celery, Task, group

from celery_compensate import install, saga

REDIS_URL = os.environ.get('SHOP_REDIS_URL', 'redis://localhost:6379/0')

app = Celery('shop', broker=REDIS_URL)
app.conf.update(
    compensate_key_prefix='shop-saga',
    task_default_queue='shop',
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
install(app)

db = redis.Redis.from_url(REDIS_URL, decode_responses=True)


class PaymentDeclined(Exception):
    """The customer's balance does not cover the order."""


class NoCourier(Exception):
    """No courier serves the address."""


class OutOfStock(Exception):
    """Not enough stock for the order."""


def log(order_id: str, line: str) -> None:
    db.rpush(f'shop:trail:{order_id}', line)


def once(task: Task) -> bool:
    """True the first time an undo runs for its saga step (idempotency)."""
    key = task.request.compensate_idempotency_key
    return bool(db.set(f'shop:undone:{key}', 1, nx=True, ex=86400))


# -- stock ------------------------------------------------------------------

@app.task(bind=True)
def release_stock(self: Task, reservation: str, order_id: str, sku: str,
                  qty: int) -> None:
    if once(self):
        db.incrby(f'shop:stock:{sku}', qty)
        log(order_id, f'undo: released {qty} x {sku} ({reservation})')


@app.task(compensate_with=release_stock)
def reserve_stock(order_id: str, sku: str, qty: int) -> str:
    left = db.decrby(f'shop:stock:{sku}', qty)
    if left < 0:
        db.incrby(f'shop:stock:{sku}', qty)
        raise OutOfStock(f'only {left + qty} x {sku} left')
    log(order_id, f'do:   reserved {qty} x {sku}')
    return f'res-{order_id}'


# -- payment ----------------------------------------------------------------

@app.task(bind=True)
def refund_payment(self: Task, payment: str, reservation: str, order_id: str,
                   customer: str, amount: int) -> None:
    if once(self):
        db.incrby(f'shop:balance:{customer}', amount)
        log(order_id, f'undo: refunded {amount} to {customer} ({payment})')


@app.task(compensate_with=refund_payment)
def charge_payment(reservation: str, order_id: str, customer: str,
                   amount: int) -> str:
    left = db.decrby(f'shop:balance:{customer}', amount)
    if left < 0:
        db.incrby(f'shop:balance:{customer}', amount)
        raise PaymentDeclined(f'{customer} cannot pay {amount}')
    log(order_id, f'do:   charged {amount} to {customer}')
    return f'pay-{order_id}'


# -- shipment and invoice (a parallel stage) --------------------------------

@app.task(bind=True)
def cancel_shipment(self: Task, booking: str, order_id: str,
                    address: str) -> None:
    if once(self):
        db.incr('shop:couriers')
        log(order_id, f'undo: cancelled shipment {booking}')


@app.task(compensate_with=cancel_shipment)
def book_shipment(order_id: str, address: str) -> str:
    if address == 'nowhere':
        raise NoCourier(f'no courier delivers to {address!r}')
    db.decr('shop:couriers')
    log(order_id, f'do:   booked shipment to {address}')
    return f'ship-{order_id}'


@app.task(bind=True)
def void_invoice(self: Task, invoice: str, order_id: str, amount: int) -> None:
    if once(self):
        db.hdel('shop:invoices', invoice)
        log(order_id, f'undo: voided invoice {invoice}')


@app.task(compensate_with=void_invoice)
def issue_invoice(order_id: str, amount: int) -> str:
    invoice = f'inv-{order_id}'
    db.hset('shop:invoices', invoice, amount)
    log(order_id, f'do:   issued invoice {invoice}')
    return invoice


@app.task
def notify(results: list, order_id: str, customer: str) -> None:
    log(order_id, f'do:   notified {customer}')


def place_order(customer: str, sku: str, qty: int, amount: int,
                address: str):
    """Start the order saga; returns its SagaResult."""
    order_id = uuid.uuid4().hex[:6]
    return order_id, saga(
        reserve_stock.si(order_id, sku, qty),
        charge_payment.s(order_id, customer, amount),
        group(book_shipment.si(order_id, address),
              issue_invoice.si(order_id, amount)),
        notify.s(order_id, customer),
    ).apply_async()
