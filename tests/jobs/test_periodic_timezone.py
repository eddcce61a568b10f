"""Real workers defer a periodic task in a time zone at the right absolute instant, once.

The deferrer's clock (jobs/engine/periodic.py: `clock`) is moved to two seconds before a DST
change in Europe/Paris instead of waiting for one; it then runs at the real rate, so the worker
sleeps as it would in production. The only periodic task is `tests.periodic_stamp`, declared
with a schedule for the length of the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

import pytest
from django.db import connection
from procrastinate.contrib.django import app
from procrastinate.periodic import PeriodicTask

from jobs.engine import periodic
from jobs.tasking import registry
from jobs.tasking.cron import CronSchedule
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import query

pytestmark = pytest.mark.django_db(transaction=True)

KEY = ("tests.periodic_stamp", "dst-test")


def at(*fields: int) -> int:
    return int(datetime(*fields, tzinfo=UTC).timestamp())


def schedule(monkeypatch, cron: str, zone: str) -> None:
    task = PeriodicTask(task=tasks.periodic_stamp, cron=cron, periodic_id=KEY[1], configure_kwargs={})
    monkeypatch.setattr(app.periodic_registry, "periodic_tasks", {KEY: task})
    monkeypatch.setitem(registry._SCHEDULES, KEY, CronSchedule(cron, zone))


def clock_from(monkeypatch, fake_start: float) -> float:
    """The deferrer's clock reads `fake_start` now and runs on; returns the real time it reads it."""
    offset = fake_start - time.time()
    monkeypatch.setattr(periodic, "clock", lambda: time.time() + offset)
    return fake_start - offset


def defers() -> list[tuple]:
    return query(
        "SELECT d.defer_timestamp, j.args->>'timestamp', j.status, extract(epoch FROM e.at)::float"
        " FROM procrastinate_periodic_defers d JOIN procrastinate_jobs j ON j.id = d.job_id"
        " JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'deferred'"
        " WHERE d.task_name = %s AND d.periodic_id = %s ORDER BY d.defer_timestamp",
        list(KEY),
    )


def run_workers(count: int, *, until, timeout: float = 20.0) -> None:
    """`count` workers, each with its own periodic deferrer, until `until()` or `timeout`."""

    def done() -> bool:
        try:
            return until()
        finally:
            connection.close()  # the thread's own connection, or the test database stays in use

    async def scenario() -> None:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                workers = [
                    asyncio.create_task(
                        worker_app.run_worker_async(
                            queues=[tasks.QUEUE_A],
                            wait=True,
                            install_signal_handlers=False,
                            listen_notify=False,
                            fetch_job_polling_interval=0.2,
                        )
                    )
                    for _ in range(count)
                ]
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and not await asyncio.to_thread(done):
                    await asyncio.sleep(0.1)
                for worker in workers:
                    worker.cancel()
                for worker in workers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await worker

    asyncio.run(scenario())


def test_a_time_skipped_in_spring_is_deferred_once_at_the_end_of_the_gap_by_two_workers(monkeypatch):
    # 02:30 does not exist in Paris on 29 March 2026: clocks go from 02:00 to 03:00 at 01:00 UTC.
    schedule(monkeypatch, "30 2 * * *", "Europe/Paris")
    due = at(2026, 3, 29, 1, 0)
    real_due = clock_from(monkeypatch, due - 2)

    run_workers(2, until=lambda: [row[2] for row in defers()] == ["succeeded"])

    rows = defers()
    assert [(row[0], row[1], row[2]) for row in rows] == [(due, str(due), "succeeded")]
    assert rows[0][3] >= real_due - 0.05, "deferred before its instant"


def test_a_time_repeated_in_autumn_is_deferred_at_its_first_occurrence_only(monkeypatch):
    # 02:30 happens twice in Paris on 25 October 2026: at 00:30 UTC (summer time) and 01:30 UTC.
    schedule(monkeypatch, "30 2 * * *", "Europe/Paris")
    first = at(2026, 10, 25, 0, 30)
    clock_from(monkeypatch, first - 2)
    run_workers(1, until=lambda: [row[2] for row in defers()] == ["succeeded"])
    assert [(row[0], row[2]) for row in defers()] == [(first, "succeeded")]

    second = at(2026, 10, 25, 1, 30)
    clock_from(monkeypatch, second - 2)
    run_workers(1, until=lambda: len(defers()) > 1, timeout=4.0)  # past the second 02:30
    assert [row[0] for row in defers()] == [first]


def test_friday_two_oclock_in_paris_is_deferred_at_midnight_utc_in_summer(monkeypatch):
    schedule(monkeypatch, "0 2 * * FRI", "Europe/Paris")
    due = at(2026, 7, 3, 0, 0)  # Friday 3 July 2026, 02:00 CEST
    clock_from(monkeypatch, due - 2)
    run_workers(1, until=lambda: [row[2] for row in defers()] == ["succeeded"])
    assert [(row[0], row[2]) for row in defers()] == [(due, "succeeded")]
