"""Stock Procrastinate, the reference: its own App, connector and defaults, a no-op task.

python -m procrastinate --app=bench.stock_app.app worker --concurrency 10 --queues bench_stock
"""

from __future__ import annotations

import os

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_DSN", "")))


@app.task(name="bench.stock_noop", queue="bench_stock")
def stock_noop(i: int = 0) -> None:
    return None
