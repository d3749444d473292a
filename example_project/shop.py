"""A small order service: reserve stock, charge payment, then (in
parallel) book a courier and issue the invoice, then e-mail the customer.

Every forward task changes real state in Redis and every undo puts it
back, so the demo can show that after compensation the books balance:

- ``shop:stock:<sku>``: units in stock
- ``shop:balance:<customer>``: money on the customer's account
- ``shop:couriers:<city>``: free courier slots in the city
- ``shop:invoices``: invoice id -> amount (a hash)
- ``shop:outbox``: the e-mails sent (a list)
- ``shop:email:<customer>``, ``shop:taxid:<customer>``: customer data
- ``shop:audit:<order>``: what each task did for the order (a hash: task
  name -> a line the demo prints)
- ``shop:undone:<idempotency key>``: the undos that ran
- ``shop:fault:refund-timeouts:<customer>``: how many refund attempts time
  out (a fault the demo injects; attempts are counted per undo in
  ``shop:refund-attempts:<idempotency key>``)

Undos mark themselves done under the idempotency key celery_compensate
puts in their request headers, in the same transaction as their effect, so
a repeated undo changes nothing twice.  Run a worker with
``celery -A example_project.shop worker -Q shop``; ``SHOP_REDIS_URL``
names the Redis (broker and saga store).
"""
from __future__ import annotations

import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import redis
from celery import Celery, Task, group
from redis.client import Pipeline

from celery_compensate import SagaResult, install, saga

REDIS_URL = os.environ.get('SHOP_REDIS_URL', 'redis://localhost:6379/0')
#: a file: trace the sagas, their spans written there (``make demo-traces``)
TRACES = os.environ.get('SHOP_TRACES')
#: simulated network latency of every task, in seconds (0 to switch off)
LATENCY = float(os.environ.get('SHOP_LATENCY', '0.15'))

app = Celery('shop', broker=REDIS_URL)
app.conf.update(
    compensate_key_prefix='shop-saga',
    # a failed undo is tried again after 0.2 s, 0.4 s, 0.8 s: the demo's
    # flaky refund recovers on its 3rd attempt, well inside the budget
    compensate_undo_max_attempts=4,
    compensate_undo_retry_backoff=0.2,
    compensate_undo_retry_backoff_max=2.0,
    task_default_queue='shop',
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if TRACES:
    from .traces import export_to
    export_to(TRACES)
install(app, tracing=bool(TRACES))

db = redis.Redis.from_url(REDIS_URL, decode_responses=True)


class OutOfStock(Exception):
    """Not enough stock for the order."""


class PaymentDeclined(Exception):
    """The customer's balance does not cover the order."""


class GatewayTimeout(Exception):
    """The payment gateway did not answer in time."""


class NoCourier(Exception):
    """No courier slot left in the customer's city."""


class InvoiceRejected(Exception):
    """The invoice cannot be issued (no tax id on file)."""


class MailBounced(Exception):
    """The customer's mail server rejected the confirmation."""


def work() -> None:
    """Pretend to talk to a remote system."""
    if LATENCY:
        time.sleep(LATENCY * random.uniform(0.5, 1.5))


def audit(order_id: str, task: Task, line: str) -> None:
    """Record what ``task`` did for the order (the demo prints it)."""
    db.hset(f'shop:audit:{order_id}', task.name.rsplit('.', 1)[-1], line)


def once(task: Task, effect: Callable[[Pipeline], object],
         ) -> list[Any] | None:
    """Apply an undo's ``effect`` (commands queued on ``pipe``) the first
    time the undo runs for its saga step, in one transaction with the mark
    that it ran, keyed by its idempotency key; return the commands'
    replies, or None when it already ran (a repeated or duplicated undo)."""
    mark = f'shop:undone:{task.request.compensate_idempotency_key}'
    with db.pipeline() as pipe:
        try:
            pipe.watch(mark)
            if pipe.exists(mark):
                return None
            pipe.multi()
            pipe.set(mark, 1, ex=86400)
            effect(pipe)
            return pipe.execute()[1:]
        except redis.WatchError:  # a copy of this undo got there first
            return None


# -- stock ------------------------------------------------------------------

@app.task(bind=True)
def release_stock(self: Task, reservation: str, order_id: str, sku: str,
                  qty: int) -> None:
    work()
    if once(self, lambda pipe: pipe.incrby(f'shop:stock:{sku}', qty)):
        audit(order_id, self, f'released {qty} x {sku}')


@app.task(bind=True, compensate_with=release_stock)
def reserve_stock(self: Task, order_id: str, sku: str, qty: int) -> str:
    work()
    left = db.decrby(f'shop:stock:{sku}', qty)
    if left < 0:
        db.incrby(f'shop:stock:{sku}', qty)
        raise OutOfStock(f'{qty} x {sku} wanted, {left + qty} in stock')
    audit(order_id, self, f'reserved {qty} x {sku}')
    return f'res-{order_id}'


# -- payment ----------------------------------------------------------------

@app.task(bind=True)
def refund_payment(self: Task, payment: str, reservation: str, order_id: str,
                   customer: str, amount: int) -> None:
    key = self.request.compensate_idempotency_key
    attempt = db.incr(f'shop:refund-attempts:{key}')
    db.expire(f'shop:refund-attempts:{key}', 86400)
    work()
    timeouts = int(db.get(f'shop:fault:refund-timeouts:{customer}') or 0)
    if attempt <= timeouts:
        raise GatewayTimeout(f'payment gateway timed out refunding {payment}')
    done = once(self, lambda pipe: pipe.incrby(f'shop:balance:{customer}',
                                               amount))
    if done:
        audit(order_id, self,
              f'refunded {amount} to {customer} (balance {done[0]})')


@app.task(bind=True, compensate_with=refund_payment)
def charge_payment(self: Task, reservation: str, order_id: str,
                   customer: str, amount: int) -> str:
    work()
    left = db.decrby(f'shop:balance:{customer}', amount)
    if left < 0:
        db.incrby(f'shop:balance:{customer}', amount)
        raise PaymentDeclined(
            f'{customer} has {left + amount}, the order costs {amount}')
    audit(order_id, self, f'charged {amount} to {customer} (balance {left})')
    return f'pay-{order_id}'


# -- courier and invoice (a parallel stage) ---------------------------------

@app.task(bind=True)
def cancel_courier(self: Task, booking: str, order_id: str, city: str) -> None:
    work()
    if once(self, lambda pipe: pipe.incr(f'shop:couriers:{city}')):
        audit(order_id, self, f'cancelled courier {booking} in {city}')


@app.task(bind=True, compensate_with=cancel_courier)
def book_courier(self: Task, order_id: str, city: str) -> str:
    work()
    free = db.decr(f'shop:couriers:{city}')
    if free < 0:
        db.incr(f'shop:couriers:{city}')
        raise NoCourier(f'no courier slot free in {city}')
    audit(order_id, self, f'booked courier ship-{order_id} in {city}')
    return f'ship-{order_id}'


@app.task(bind=True)
def void_invoice(self: Task, invoice: str, order_id: str, customer: str,
                 amount: int) -> None:
    work()
    if once(self, lambda pipe: pipe.hdel('shop:invoices', invoice)):
        audit(order_id, self, f'voided invoice {invoice}')


@app.task(bind=True, compensate_with=void_invoice)
def issue_invoice(self: Task, order_id: str, customer: str,
                  amount: int) -> str:
    work()
    if not db.get(f'shop:taxid:{customer}'):
        raise InvoiceRejected(f'no tax id on file for {customer}')
    invoice = f'INV-{order_id}'
    db.hset('shop:invoices', invoice, amount)
    audit(order_id, self, f'issued invoice {invoice} over {amount}')
    return invoice


# -- notification (the last step: an e-mail cannot be unsent) ---------------

@app.task(bind=True)
def notify(self: Task, booked: list, order_id: str, customer: str) -> None:
    work()
    email = db.get(f'shop:email:{customer}') or ''
    if not email or email.endswith('.invalid'):
        raise MailBounced(f'mail to {email or customer!r} bounced')
    db.rpush('shop:outbox', f'{email}: order {order_id} is on its way')
    audit(order_id, self, f'e-mailed {email}')


# -- the service's API ------------------------------------------------------

def place_order(order_id: str, customer: str, sku: str, qty: int,
                amount: int, city: str) -> SagaResult:
    """Start the order's saga (its id names the order) and return it."""
    return saga(
        reserve_stock.si(order_id, sku, qty),
        charge_payment.s(order_id, customer, amount),
        group(book_courier.si(order_id, city),
              issue_invoice.si(order_id, customer, amount)),
        notify.s(order_id, customer),
    ).apply_async(saga_id=f'order-{order_id}-{uuid.uuid4().hex[:8]}')


def trail(order_id: str) -> dict[str, str]:
    """What each task did for the order: short task name -> line."""
    return db.hgetall(f'shop:audit:{order_id}')


@dataclass
class Books:
    """Everything the shop's tasks change, at one moment."""

    stock: dict[str, int] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    couriers: dict[str, int] = field(default_factory=dict)
    invoices: dict[str, int] = field(default_factory=dict)
    emails: int = 0


def open_shop(books: Books, customers: Mapping[str, Mapping[str, Any]],
              ) -> None:
    """Forget every order and start from ``books``; ``customers`` maps a
    name to its ``email``, ``taxid`` and ``refund_timeouts`` (a fault)."""
    keys = list(db.scan_iter('shop:*', count=1000))
    if keys:
        db.delete(*keys)
    pipe = db.pipeline()
    for sku, n in books.stock.items():
        pipe.set(f'shop:stock:{sku}', n)
    for customer, n in books.balances.items():
        pipe.set(f'shop:balance:{customer}', n)
    for city, n in books.couriers.items():
        pipe.set(f'shop:couriers:{city}', n)
    if books.invoices:
        pipe.hset('shop:invoices', mapping=books.invoices)
    for name, info in customers.items():
        for what in ('email', 'taxid'):
            if info.get(what):
                pipe.set(f'shop:{what}:{name}', info[what])
        if info.get('refund_timeouts'):
            pipe.set(f'shop:fault:refund-timeouts:{name}',
                     info['refund_timeouts'])
    pipe.execute()


def read_books() -> Books:
    """The books as they are now."""
    def counts(kind: str) -> dict[str, int]:
        keys = sorted(db.scan_iter(f'shop:{kind}:*', count=1000))
        values = db.mget(keys) if keys else []
        return {k.split(':', 2)[2]: int(v) for k, v in zip(keys, values, strict=True)}

    return Books(
        stock=counts('stock'), balances=counts('balance'),
        couriers=counts('couriers'),
        invoices={k: int(v) for k, v in db.hgetall('shop:invoices').items()},
        emails=db.llen('shop:outbox'),
    )
