"""Jobs sharing a `lock` run one after the other: the next one starts as soon as the one before
it has ended, not at the worker's next poll (issue 11, item 10). The workers poll every
POLL_SECONDS here; a successor must start well inside that, which only a wake-up explains."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import pytest

from jobs.tasking.defer import job_defer
from tests.helpers import run_worker, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import event_times, job_status, start_test_worker, wait_for_workers

pytestmark = pytest.mark.django_db(transaction=True)

POLL_SECONDS = 5.0
SOON = timedelta(seconds=POLL_SECONDS / 2)  # orders of magnitude above the milliseconds it takes


def _start_delay(first: int, second: int) -> timedelta:
    [first_ended] = event_times(first, "succeeded")
    [second_started] = event_times(second, "started")
    return second_started - first_ended


def _worker(queue: str, *, concurrency: int, listen: bool):
    args = ["--queues", queue, "--concurrency", str(concurrency), "--fetch-job-polling-interval", str(POLL_SECONDS)]
    return start_test_worker(*args, *([] if listen else ["--no-listen-notify"]), env={"PYTHONUNBUFFERED": "1"})


def test_the_next_job_of_a_lock_starts_on_the_same_worker_when_the_first_ends():
    # Two free slots: the second claim finds the successor locked, and the worker then waits
    # for a NOTIFY or its poll; nothing but the end of the first job can wake it in time.
    first = job_defer(tasks.stamp_a, lock="lock-test", n=1, sleep=0.5)
    second = job_defer(tasks.stamp_a, lock="lock-test", n=2)
    worker = _worker(tasks.QUEUE_A, concurrency=2, listen=False)
    try:
        wait_for(lambda: job_status(second) == "succeeded", timeout=90, what="the second job")
    finally:
        output = stop_worker(worker)
    assert _start_delay(first, second) < SOON, output


def test_the_next_job_of_a_lock_starts_on_another_worker_when_the_first_ends():
    # The lock spans two queues, each served by its own worker: only a NOTIFY sent when the
    # first job's end commits can tell the second worker.
    worker_a = _worker(tasks.QUEUE_A, concurrency=1, listen=True)
    worker_b = _worker(tasks.QUEUE_B, concurrency=1, listen=True)
    try:
        wait_for_workers(2, timeout=120)  # both listening: the first job's NOTIFY reaches A
        first = job_defer(tasks.stamp_a, lock="lock-test", n=1, sleep=0.5)
        second = job_defer(tasks.stamp_b, lock="lock-test", n=2)
        wait_for(lambda: job_status(second) == "succeeded", timeout=90, what="the second job")
    finally:
        output = stop_worker(worker_a) + stop_worker(worker_b)
    assert _start_delay(first, second) < SOON, output


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_worker_that_stops_when_the_queue_is_empty_runs_every_job_of_a_lock(concurrency):
    first = job_defer(tasks.stamp_a, lock="lock-test", n=1, sleep=0.2)
    second = job_defer(tasks.stamp_a, lock="lock-test", n=2)

    run_worker(queues=[tasks.QUEUE_A], concurrency=concurrency)  # wait=False

    assert [job_status(first), job_status(second)] == ["succeeded", "succeeded"]


def test_the_claim_after_a_lock_holder_ends_sees_its_end(monkeypatch):
    # The end of a job is written after its slot is free. When that job held a lock, the next
    # claim must wait for the write: a claim that runs while the end is still being written
    # finds the successor blocked, and the successor then waits for the write to commit and
    # one more claim (under load, the tens of milliseconds Procrastinate's own acceptance tests
    # lose their one-second windows to). The write is slowed here to make the race certain.
    from procrastinate import jobs as procrastinate_jobs
    from procrastinate.contrib.django import app

    from jobs.engine import manager as manager_module

    first = job_defer(tasks.stamp_a, lock="lock-test", n=1)
    second = job_defer(tasks.stamp_a, lock="lock-test", n=2)
    claims: list[list[int]] = []

    async def scenario() -> None:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            manager = worker_app.job_manager
            fetch_jobs = manager.fetch_jobs
            execute = manager.connector.execute_query_all_async

            async def spied_fetch_jobs(*args, **kwargs) -> list[procrastinate_jobs.Job]:
                found = await fetch_jobs(*args, **kwargs)
                claims.append([job.id for job in found])
                return found

            async def slow_finish(query: str, **arguments):
                if query == manager_module.FINISH_JOBS:
                    await asyncio.sleep(0.3)
                return await execute(query, **arguments)

            monkeypatch.setattr(manager, "fetch_jobs", spied_fetch_jobs)
            monkeypatch.setattr(manager.connector, "execute_query_all_async", slow_finish)
            async with worker_app.open_async():
                worker = asyncio.create_task(
                    worker_app.run_worker_async(
                        queues=[tasks.QUEUE_A],
                        concurrency=1,  # no second slot claiming while the first job runs
                        wait=True,
                        install_signal_handlers=False,
                        listen_notify=False,
                        fetch_job_polling_interval=POLL_SECONDS,
                    )
                )
                for _ in range(200):
                    if [second] in claims or worker.done():
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # its end written
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker

    asyncio.run(scenario())
    assert [first] in claims and [second] in claims, claims
    between = claims[claims.index([first]) + 1 : claims.index([second])]
    assert between == [], f"claims between the two jobs of the lock: {between}"
