"""The shop's order saga, tested with celery_compensate's test kit: one
order that completes, and one that fails at each step, undoing exactly
what ran before, in reverse, with the arguments the undos need."""
from __future__ import annotations

import pytest

from celery_compensate.contrib.pytest import any_order, assert_trail
from example_project import shop

ORDER = '42'
RES, PAY, SHIP, INV = f'res-{ORDER}', f'pay-{ORDER}', f'ship-{ORDER}', \
    f'INV-{ORDER}'
QTY, AMOUNT = 2, 120

DO_RESERVE = ('do', 'reserve_stock', (ORDER, 'sku-1', QTY))
DO_CHARGE = ('do', 'charge_payment', (RES, ORDER, 'ada', AMOUNT))
DO_COURIER = ('do', 'book_courier', (ORDER, 'berlin'))
DO_INVOICE = ('do', 'issue_invoice', (ORDER, 'ada', AMOUNT))
DO_NOTIFY = ('do', 'notify', ([SHIP, INV], ORDER, 'ada'))
UNDO_RESERVE = ('undo', 'reserve_stock', (RES, ORDER, 'sku-1', QTY))
UNDO_CHARGE = ('undo', 'charge_payment', (PAY, RES, ORDER, 'ada', AMOUNT))
UNDO_COURIER = ('undo', 'book_courier', (SHIP, ORDER, 'berlin'))
UNDO_INVOICE = ('undo', 'issue_invoice', (INV, ORDER, 'ada', AMOUNT))


def place(customer: str = 'ada'):
    return shop.place_order(ORDER, customer, 'sku-1', QTY, AMOUNT, 'berlin')


def test_an_order_completes(books, compensate_worker):
    res = place()
    assert_trail(res, [DO_RESERVE, DO_CHARGE,
                       any_order(DO_COURIER, DO_INVOICE), DO_NOTIFY],
                 state='COMPLETED')
    after = shop.read_books()
    assert after.stock == {'sku-1': books.stock['sku-1'] - QTY}
    assert after.balances['ada'] == books.balances['ada'] - AMOUNT
    assert after.couriers == {'berlin': books.couriers['berlin'] - 1}
    assert after.invoices == {INV: AMOUNT}
    assert after.emails == 1


#: the failing step, what the shop raises there, and the runs expected
FAILURES = {
    'reserve_stock': (shop.OutOfStock, [DO_RESERVE]),
    'charge_payment': (shop.PaymentDeclined,
                       [DO_RESERVE, DO_CHARGE, UNDO_RESERVE]),
    # a parallel member fails: its sibling completes and is undone first
    'book_courier': (shop.NoCourier, [
        DO_RESERVE, DO_CHARGE, any_order(DO_COURIER, DO_INVOICE),
        UNDO_INVOICE, UNDO_CHARGE, UNDO_RESERVE]),
    'issue_invoice': (shop.InvoiceRejected, [
        DO_RESERVE, DO_CHARGE, any_order(DO_COURIER, DO_INVOICE),
        UNDO_COURIER, UNDO_CHARGE, UNDO_RESERVE]),
    # the last step has no undo (an e-mail cannot be unsent)
    'notify': (shop.MailBounced, [
        DO_RESERVE, DO_CHARGE, any_order(DO_COURIER, DO_INVOICE), DO_NOTIFY,
        any_order(UNDO_COURIER, UNDO_INVOICE), UNDO_CHARGE, UNDO_RESERVE]),
}


@pytest.mark.parametrize('step', list(FAILURES))
def test_a_failing_step_undoes_what_ran_before_it(books, compensate_worker,
                                                  inject, step):
    error, expected = FAILURES[step]
    inject.fail(step, error)
    res = place()
    assert_trail(res, expected, state='COMPENSATED')
    failed = [s for s in res.steps if s.failure]
    assert [s.task_name.rsplit('.', 1)[-1] for s in failed] == [step]
    assert failed[0].failure.startswith(error.__name__)
    # every effect undone: the books are as they were
    assert shop.read_books() == books


def test_a_real_fault_no_tax_id_needs_no_injection(books, compensate_worker):
    res = place(customer='bob')
    assert_trail(res, [
        DO_RESERVE, ('do', 'charge_payment', (RES, ORDER, 'bob', AMOUNT)),
        any_order(DO_COURIER, ('do', 'issue_invoice', (ORDER, 'bob', AMOUNT))),
        UNDO_COURIER,
        ('undo', 'refund_payment', (PAY, RES, ORDER, 'bob', AMOUNT)),
        UNDO_RESERVE,
    ], state='COMPENSATED')
    assert 'InvoiceRejected: no tax id on file for bob' in res.traceback
    assert shop.read_books() == books


def test_a_refund_that_times_out_twice_is_retried(books, compensate_worker,
                                                  inject):
    inject.fail('notify', shop.MailBounced)
    inject.fail('refund_payment', shop.GatewayTimeout, times=2)
    res = place()
    runs = assert_trail(res, [
        DO_RESERVE, DO_CHARGE, any_order(DO_COURIER, DO_INVOICE), DO_NOTIFY,
        any_order(UNDO_COURIER, UNDO_INVOICE),
        UNDO_CHARGE, UNDO_CHARGE, UNDO_CHARGE, UNDO_RESERVE,
    ], state='COMPENSATED')
    assert [r.outcome for r in runs if r.task.endswith('.refund_payment')] == [
        'failed', 'failed', 'ok']
    assert shop.read_books() == books
