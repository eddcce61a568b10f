"""Stock Procrastinate, the reference: its own App, connector and defaults, a no-op task.

python -m procrastinate --app=bench.stock_app.app worker --concurrency 10 --queues bench_stock
"""

from __future__ import annotations

import os
import time

from procrastinate import App, PsycopgConnector

from bench import starts

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_DSN", "")))


@app.task(name="bench.stock_noop", queue="bench_stock")
def stock_noop(i: int = 0, sent_at: float | None = None) -> None:
    # sent_at: the client's time.time() just before the defer (the latency figure only).
    if sent_at is not None:
        starts.record(i, sent_at, time.time())
