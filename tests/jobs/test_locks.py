"""Jobs sharing a `lock` run one after the other: the next one starts as soon as the one before
it has ended, not at the worker's next poll (issue 11, item 10). The workers poll every
POLL_SECONDS here; a successor must start well inside that, which only a wake-up explains."""

from __future__ import annotations

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
