"""``make demo``: run a few orders through a real worker and show what was
done and undone, then prove the books balance.

Uses ``REDIS_URL`` when set, else a throwaway Redis (``redis-server`` from
PATH, else an embedded one), starts a worker, and stops everything it
started, also on Ctrl-C.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from celery_compensate import SagaState, StepState
from celery_compensate.testing import WorkerProcess, redis_server

ROOT = Path(__file__).resolve().parent.parent
STOCK, BALANCES, COURIERS = 10, {'alice': 100, 'bob': 5, 'carol': 100}, 5

ORDERS = [  # customer, sku, qty, amount, address, what should happen
    ('alice', 'widget', 2, 40, 'Main St 1', 'completes'),
    ('bob', 'widget', 1, 20, 'Elm St 2', 'payment declined'),
    ('carol', 'widget', 3, 60, 'nowhere', 'no courier after payment'),
]


def main() -> int:
    with redis_server(env_names=('REDIS_URL',)) as url:
        os.environ['SHOP_REDIS_URL'] = url
        from example_project import shop  # reads SHOP_REDIS_URL

        db = shop.db
        for key in db.scan_iter('shop:*'):
            db.delete(key)
        db.set('shop:stock:widget', STOCK)
        db.set('shop:couriers', COURIERS)
        for customer, balance in BALANCES.items():
            db.set(f'shop:balance:{customer}', balance)
        print(f'redis: {url}\nstarting a worker ...', flush=True)
        worker = WorkerProcess('example_project.shop', {'SHOP_REDIS_URL': url},
                               '-c', '2', '-Q', 'shop', name='shop', cwd=ROOT)
        try:
            worker.start()
            return run_orders(shop, db)
        finally:
            worker.stop()


def run_orders(shop: Any, db: Any) -> int:
    started = []
    for customer, sku, qty, amount, address, expect in ORDERS:
        order_id, res = shop.place_order(customer, sku, qty, amount, address)
        print(f'order {order_id}: {customer} buys {qty} x {sku} for {amount} '
              f'({expect}) -> saga {res.id}', flush=True)
        started.append((order_id, res, qty, amount, customer))
    ok = True
    for order_id, res, *_ in started:
        state = res.wait(timeout=60)
        print(f'\norder {order_id}: {state.value}')
        for line in db.lrange(f'shop:trail:{order_id}', 0, -1):
            print(f'  {line}')
        for step in res.steps:
            if step.state is StepState.FAILED:
                print(f'  failed: {step.task_name}: {step.failure}')
    done = [o for o in started if o[1].state is SagaState.COMPLETED]
    stock = int(db.get('shop:stock:widget'))
    couriers = int(db.get('shop:couriers'))
    expected_stock = STOCK - sum(o[2] for o in done)
    print('\nbooks after all orders:')
    print(f'  widget stock {STOCK} -> {stock} (expected {expected_stock})')
    ok &= stock == expected_stock
    ok &= couriers == COURIERS - len(done)
    print(f'  courier slots {COURIERS} -> {couriers} (expected '
          f'{COURIERS - len(done)})')
    for customer, balance in BALANCES.items():
        paid = sum(o[3] for o in done if o[4] == customer)
        now = int(db.get(f'shop:balance:{customer}'))
        ok &= now == balance - paid
        print(f'  {customer:<6} balance {balance} -> {now} (expected '
              f'{balance - paid})')
    invoices = db.hlen('shop:invoices')
    ok &= invoices == len(done)
    print(f'  invoices {invoices} (expected {len(done)})')
    print('\nthe books balance: nothing leaked' if ok else
          '\nTHE BOOKS DO NOT BALANCE')
    return 0 if ok else 1


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # the context managers above already stopped the worker and Redis
        print('\ninterrupted: stopped the worker and Redis')
        sys.exit(130)
