"""The demo's orders, customers and opening books: which order should
fail where, and why."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from celery_compensate import SagaState

STOCK = {'widget': 10, 'gizmo': 2}
COURIERS = {'Berlin': 3, 'Paris': 2, 'Lyon': 0}
CUSTOMERS: dict[str, dict[str, Any]] = {  # balance, e-mail, tax id, faults
    'alice': {'balance': 100, 'email': 'alice@example.com', 'taxid': 'DE1'},
    'bob': {'balance': 80, 'email': 'bob@example.com', 'taxid': 'DE2'},
    'carol': {'balance': 15, 'email': 'carol@example.com', 'taxid': 'FR3'},
    'dave': {'balance': 120, 'email': 'dave@example.com', 'taxid': 'FR4'},
    'erin': {'balance': 90, 'email': 'erin@example.com', 'taxid': None,
             'refund_timeouts': 2},
    'frank': {'balance': 75, 'email': 'frank@example.invalid',
              'taxid': 'FR6'},
    'grace': {'balance': 60, 'email': 'grace@example.com', 'taxid': 'DE7'},
}


@dataclass(frozen=True)
class Order:
    """One order of the demo and how it should end."""

    order_id: str
    customer: str
    sku: str
    qty: int
    amount: int
    city: str
    story: str                  #: what should happen, in words
    fails_at: str | None = None  #: the step that should fail

    @property
    def expected(self) -> SagaState:
        return SagaState.COMPENSATED if self.fails_at else SagaState.COMPLETED

    def describe(self) -> str:
        return (f'{self.customer} buys {self.qty} x {self.sku} for '
                f'{self.amount}, delivery to {self.city}')


ORDERS = [
    Order('1001', 'alice', 'widget', 2, 40, 'Berlin', 'completes'),
    Order('1002', 'bob', 'gizmo', 3, 90, 'Berlin',
          'out of stock at the first step', 'reserve_stock'),
    Order('1003', 'carol', 'widget', 1, 20, 'Paris',
          'payment declined', 'charge_payment'),
    Order('1004', 'dave', 'widget', 1, 30, 'Lyon',
          'no courier in Lyon, after payment', 'book_courier'),
    Order('1005', 'erin', 'widget', 1, 25, 'Paris',
          'no tax id for the invoice; the refund times out twice',
          'issue_invoice'),
    Order('1006', 'frank', 'widget', 2, 50, 'Paris',
          'confirmation e-mail bounces at the last step', 'notify'),
    Order('1007', 'grace', 'gizmo', 1, 35, 'Berlin', 'completes'),
]


def initial_books(shop: ModuleType) -> Any:
    """The books the demo opens the shop with (a ``shop.Books``)."""
    return shop.Books(
        stock=dict(STOCK), couriers=dict(COURIERS),
        balances={c: info['balance'] for c, info in CUSTOMERS.items()})
