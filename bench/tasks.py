"""The benchmark's no-op task, registered in the project's app (PROCRASTINATE_IMPORT_PATHS=bench.tasks),
so it runs through the project's own worker configuration: middleware, paused-queue fetch and all."""

from __future__ import annotations

import time

from bench import starts
from jobs import job_task


@job_task(name="bench.noop", queue="bench")
def noop(i: int = 0, sent_at: float | None = None) -> None:
    # sent_at: the client's time.time() just before the defer (the latency figure only).
    if sent_at is not None:
        starts.record(i, sent_at, time.time())


@job_task(name="bench.noop_keyed", queue="bench", concurrency=1000, concurrency_key="bench:{owner_id}")
def noop_keyed(i: int = 0) -> None:
    """The no-op with a concurrency key per owner, its limit too high to bind: what the slot
    accounting costs (bench/feature_costs.py)."""
