"""``make flower``: the demo's orders, then Flower to look at them.

Flower only sees the events sent while it runs (it keeps no history), so
it is started first, the worker sends task events (``-E``) and heartbeats,
the orders are placed once Flower has heard from the worker, and
everything keeps running until Ctrl-C.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING

from celery_compensate.testing import FlowerProcess

from .display import Console, celery_command

if TYPE_CHECKING:
    from .demo import Run, Started


def start_flower(started: Started, console: Console,
                 broker_url: str) -> FlowerProcess:
    """Flower on ``FLOWER_ADDRESS:FLOWER_PORT`` (default 127.0.0.1:5555),
    stopped with the rest of what the demo ``started``."""
    port = int(os.environ.get('FLOWER_PORT') or 5555)
    address = os.environ.get('FLOWER_ADDRESS') or '127.0.0.1'
    with socket.socket() as probe:  # else Flower's health check could
        # reach whatever holds the port (SO_REUSEADDR as Flower binds it)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            raise SystemExit(f'cannot serve Flower on {address}:{port} '
                             f'({exc.strerror}); set FLOWER_PORT') from None
    # Flower's unauthenticated API can revoke tasks and stop workers: only
    # open it on this machine
    loopback = address in ('127.0.0.1', 'localhost', '::1')
    flower = FlowerProcess(broker_url, port=port, address=address,
                           open_api=loopback)
    started.add('Flower', flower.stop)
    console.line(f'flower  starting on {address}:{port} ...')
    try:
        flower.start()
    except RuntimeError:
        tail = flower.output().strip().splitlines()[-5:]
        raise SystemExit('Flower did not start:\n  '
                         + '\n  '.join(tail)) from None
    return flower


def wait_until_watching(flower: FlowerProcess, console: Console,
                        timeout: float = 15.0) -> None:
    """Wait until Flower has an event from a worker (so it sees every task
    from now on: it missed the ones sent before it listened)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            workers = json.loads(flower.get('/workers?json=1'))['data']
        except (OSError, ValueError, KeyError):
            workers = []
        if any(w.get('status') for w in workers):
            console.line('        sees the worker')
            return
        time.sleep(0.2)
    console.line(f'        has not seen the worker after {timeout:.0f}s; '
                 'it may miss some tasks')


def public_url(flower: FlowerProcess) -> str:
    """Flower's URL as a browser would reach it."""
    if flower.url.startswith('http://0.0.0.0:'):
        return flower.url.replace('0.0.0.0', socket.gethostname(), 1)
    return flower.url


def serve(flower: FlowerProcess, runs: list[Run], console: Console) -> None:
    """Say where to look, then wait for Ctrl-C (or for Flower to die)."""
    url = public_url(flower)
    console.line(f'\nFlower: {url}/tasks')
    console.line("search a saga id in Flower's task list to see its steps "
                 '(.s<n>) and undo attempts (.u<n>.<attempt>), e.g.')
    width = max(len(r.order.customer) for r in runs)
    for run in runs:
        console.line(f'  {run.result.id}   {run.order.order_id} '
                     f'{run.order.customer:<{width}}  '
                     f'{console.state(run.state)}')
    console.line(
        'or read a saga from the store (in another terminal, here):\n  '
        + celery_command('"$REDIS_URL"' if os.environ.get('REDIS_URL')
                         else os.environ['SHOP_REDIS_URL'],
                         runs[-1].result.id))
    console.line('\nrunning until Ctrl-C ...')
    try:
        while flower.proc is not None and flower.proc.poll() is None:
            time.sleep(0.5)
        console.line('Flower stopped by itself:\n' + flower.output()[-2000:])
    except KeyboardInterrupt:
        console.clear()
