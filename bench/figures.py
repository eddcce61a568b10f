"""The figures of `make bench`, one function per group. Each returns Figure rows."""

from __future__ import annotations

import time

from bench.harness import Bench, Figure, percentile, wait_until


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


# --- 1. Enqueue ----------------------------------------------------------------------------


def enqueue(bench: Bench, *, quick: bool = False) -> list[Figure]:
    from django.db import transaction

    from bench.stock_app import app as stock_app
    from bench.stock_app import stock_noop
    from bench.tasks import noop
    from jobs.services import job_defer, job_defer_bulk

    one_by_one = 500 if quick else 3000
    bulk_total, batch = (5000, 1000) if quick else (40000, 1000)
    bench.reset_jobs()

    with stock_app.open():
        begun = time.perf_counter()
        for i in range(one_by_one):
            stock_noop.defer(i=i)
        stock_single = _rate(one_by_one, time.perf_counter() - begun)
        begun = time.perf_counter()
        for start in range(0, bulk_total, batch):
            stock_noop.batch_defer(*({"i": i} for i in range(start, start + batch)))
        stock_bulk = _rate(bulk_total, time.perf_counter() - begun)

    begun = time.perf_counter()
    for i in range(one_by_one):
        job_defer(noop, i=i)  # each in its own transaction, as a request would
    project_single = _rate(one_by_one, time.perf_counter() - begun)
    begun = time.perf_counter()
    for start in range(0, bulk_total, batch):
        with transaction.atomic():
            job_defer_bulk(noop, [{"i": i} for i in range(start, start + batch)])
    project_bulk = _rate(bulk_total, time.perf_counter() - begun)
    bench.reset_jobs()
    return [
        Figure(
            "enqueue one by one",
            project_single,
            "jobs/s",
            "stock defer()",
            stock_single,
            ">= 2,000",
            project_single >= 2000,
            notes=f"{one_by_one} jobs, jobs.services.job_defer, one transaction each",
        ),
        Figure(
            "enqueue in bulk",
            project_bulk,
            "jobs/s",
            "stock batch_defer()",
            stock_bulk,
            ">= 25,000",
            project_bulk >= 25000,
            notes=f"{bulk_total} jobs in batches of {batch}, jobs.services.job_defer_bulk",
        ),
    ]


# --- 2. End-to-end processing --------------------------------------------------------------


def _drain(bench: Bench, task_name: str, total: int, start_workers, timeout: float) -> tuple[float, int]:
    start_workers()
    if not wait_until(lambda: bench.remaining(task_name) == 0, timeout, interval=0.25):
        raise TimeoutError(f"{task_name}: {bench.remaining(task_name)} of {total} jobs left after {timeout:.0f} s")
    finished, span = bench.processing_span(task_name)
    return _rate(finished, span), finished


def processing(bench: Bench, *, quick: bool = False) -> list[Figure]:
    from django.db import transaction

    from bench.stock_app import app as stock_app
    from bench.stock_app import stock_noop
    from bench.tasks import noop
    from jobs.services import job_defer_bulk

    total = 3000 if quick else 20000
    bench.reset_jobs()
    with stock_app.open():
        for start in range(0, total, 1000):
            stock_noop.batch_defer(*({"i": i} for i in range(start, min(total, start + 1000))))
    stock, _ = _drain(bench, "bench.stock_noop", total, lambda: bench.stock_worker("--concurrency", "10"), timeout=180)
    bench.stop_children()

    bench.reset_jobs()
    for start in range(0, total, 1000):
        with transaction.atomic():
            job_defer_bulk(noop, [{"i": i} for i in range(start, min(total, start + 1000))])
    project, done = _drain(bench, "bench.noop", total, lambda: bench.project_worker(), timeout=180)
    bench.stop_children()
    return [
        Figure(
            "process queued no-op jobs",
            project,
            "jobs/s",
            "stock worker, concurrency 10",
            stock,
            ">= 1,500 and >= 2x stock",
            project >= 1500 and stock > 0 and project / stock >= 2,
            notes=f"{done} jobs; the project's worker as `make run` starts it",
        )
    ]


# --- 3. Enqueue-to-start latency -----------------------------------------------------------


def _trickle(bench: Bench, defer_one, count: int, per_second: float) -> None:
    interval = 1 / per_second
    next_at = time.perf_counter()
    for i in range(count):
        defer_one(i)
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))


def latency(bench: Bench, *, quick: bool = False) -> list[Figure]:
    from bench.stock_app import app as stock_app
    from bench.stock_app import stock_noop
    from bench.tasks import noop
    from jobs.services import job_defer

    count = 50 if quick else 200
    bench.reset_jobs()
    bench.stock_worker("--concurrency", "10")
    bench.wait_workers(1)
    time.sleep(1)
    with stock_app.open():
        _trickle(bench, lambda i: stock_noop.defer(i=i), count, 50)
    wait_until(lambda: bench.remaining("bench.stock_noop") == 0, 30)
    stock = bench.start_latencies_ms("bench.stock_noop")
    bench.stop_children()

    bench.reset_jobs()
    bench.project_worker()
    bench.wait_workers(1)
    time.sleep(1)
    _trickle(bench, lambda i: job_defer(noop, i=i), count, 50)
    wait_until(lambda: bench.remaining("bench.noop") == 0, 30)
    project = bench.start_latencies_ms("bench.noop")
    bench.stop_children()
    p50, p99 = percentile(project, 50), percentile(project, 99)
    return [
        Figure(
            "enqueue-to-start p50",
            p50,
            "ms",
            "stock",
            percentile(stock, 50),
            "<= 3 ms",
            p50 is not None and p50 <= 3,
            notes=f"{len(project)} jobs at 50/s into an idle, listening worker",
        ),
        Figure(
            "enqueue-to-start p99", p99, "ms", "stock", percentile(stock, 99), "<= 10 ms", p99 is not None and p99 <= 10
        ),
    ]


# --- 8. Table health -----------------------------------------------------------------------


def table_health(bench: Bench, *, quick: bool = False) -> list[Figure]:
    rows = bench.sql(
        """
        SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid)
          FROM pg_stat_user_tables
         WHERE relname IN ('procrastinate_jobs', 'procrastinate_events', 'jobs_job_info')
         ORDER BY relname
        """
    )
    return [
        Figure(
            f"{name}: dead tuples",
            float(dead),
            "rows",
            notes=f"{live} live rows, {size / 1024 / 1024:.1f} MB with indexes",
            extra={"live": live, "bytes": size},
        )
        for name, live, dead, size in rows
    ]


GROUPS = {
    "enqueue": enqueue,
    "processing": processing,
    "latency": latency,
    "health": table_health,
}
