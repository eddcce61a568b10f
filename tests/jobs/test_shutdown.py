"""Graceful shutdown: on SIGTERM a worker stops fetching, lets running jobs finish for
WORKER_SHUTDOWN_GRACE_SECONDS, then aborts the rest, which go back to the queue with their
attempt intact, and exits."""

from __future__ import annotations

import signal
import time

import pytest

from jobs.models import JobInfo
from jobs.tasking.defer import job_defer
from tests.helpers import stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_attempts, job_events, job_status, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)

GRACE = {"WORKER_SHUTDOWN_GRACE_SECONDS": "1"}


def _running(job_id: int) -> bool:
    """The job is in its task's code: it has reported progress."""
    return job_status(job_id) == "doing" and JobInfo.objects.filter(job_id=job_id, processed__isnull=False).exists()


def test_sigterm_lets_the_short_job_finish_aborts_the_long_one_back_to_the_queue_and_exits(tmp_path):
    go = tmp_path / "go"
    short = job_defer(tasks.wait_then_finish, go_path=str(go))
    long = job_defer(tasks.long_cooperative, seconds=30)

    worker = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "2", env=GRACE)
    try:
        wait_for(lambda: _running(short) and _running(long), what="both jobs to run")
        worker.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        # Deferred after SIGTERM: the short job frees a slot, but the worker fetches no more.
        late = job_defer(tasks.stamp_a, n=1)
        go.touch()  # the short job ends ~0.2 s later, inside the grace period
        returncode = worker.wait(15)
        exited_after = time.monotonic() - stopped_at
    finally:
        output = stop_worker(worker)

    assert returncode == 0, output
    assert exited_after < 10, output
    assert job_status(short) == "succeeded", output
    assert JobInfo.objects.get(job_id=short).result == "finished"

    # The long job was asked to stop after the grace period (its next job_progress raised
    # JobAborted) and went back to the queue to run again at once, its attempt not spent.
    assert job_status(long) == "todo", output
    assert job_attempts(long) == 0
    # ('scheduled' events come with any update of a todo job that has a scheduled_at.)
    assert [event for event in job_events(long) if event != "scheduled"] == [
        "deferred",
        "started",
        "deferred_for_retry",
    ]
    info = JobInfo.objects.get(job_id=long)
    assert info.processed >= 5  # it had been running for a while
    assert info.error == ""  # a shutdown is not the job's failure

    assert job_events(late) == ["deferred"]  # never taken


def test_an_async_job_is_cancelled_at_the_end_of_the_grace_period_and_requeued():
    """Procrastinate cancels an async job's coroutine; the middleware turns that into JobAborted
    so the job is re-queued, not ended `aborted` (tests.long_async has no retries)."""
    long = job_defer(tasks.long_async, seconds=30)
    worker = start_test_worker("--queues", tasks.QUEUE_A, env=GRACE)
    try:
        wait_for(lambda: _running(long), what="the async job to run")
        worker.send_signal(signal.SIGTERM)
        returncode = worker.wait(15)
    finally:
        output = stop_worker(worker)

    assert returncode == 0, output
    assert job_status(long) == "todo", output
    assert job_attempts(long) == 0
    assert JobInfo.objects.get(job_id=long).progress == {"stage": "async"}  # job_progress_async


def test_a_sync_job_that_never_checks_holds_the_process_until_it_returns(tmp_path):
    """Documents the limit of a sync task that never calls job_progress: Python cannot stop its
    thread. The worker gives up on the job after the grace period (it goes back to the queue,
    where another worker may start it while this thread still runs), but the process exits
    only once the thread returns: asyncio.run() waits for its executor's threads."""
    done = tmp_path / "done"
    stubborn = job_defer(tasks.long_stubborn, seconds=4, done_path=str(done))
    worker = start_test_worker("--queues", tasks.QUEUE_A, env=GRACE)
    try:
        wait_for(lambda: _running(stubborn), what="the stubborn job to run")
        worker.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        wait_for(lambda: job_status(stubborn) == "todo", timeout=10, what="the job to be given up")
        given_up_after = time.monotonic() - stopped_at
        still_running = worker.poll() is None and not done.exists()
        returncode = worker.wait(15)
        exited_after = time.monotonic() - stopped_at
    finally:
        output = stop_worker(worker)

    assert given_up_after < 3, output  # ~1 s grace + the middleware's 0.2 s abort poll
    assert job_attempts(stubborn) == 0
    assert still_running, output  # the job is back in the queue, the process is not gone yet
    assert done.exists()  # the thread ran to its end...
    assert returncode == 0, output
    assert exited_after >= 3  # ...and only then did the process exit


def test_a_second_sigterm_kills_a_worker_held_by_a_stubborn_job(tmp_path):
    done = tmp_path / "done"
    stubborn = job_defer(tasks.long_stubborn, seconds=10, done_path=str(done))
    worker = start_test_worker("--queues", tasks.QUEUE_A, env=GRACE)
    try:
        wait_for(lambda: _running(stubborn), what="the stubborn job to run")
        worker.send_signal(signal.SIGTERM)
        wait_for(lambda: job_status(stubborn) == "todo", timeout=10, what="the job to be given up")
        worker.send_signal(signal.SIGTERM)  # the first one restored the default handler
        returncode = worker.wait(5)
    finally:
        output = stop_worker(worker)
    assert returncode == -signal.SIGTERM, output
    assert not done.exists()
    assert job_status(stubborn) == "todo"  # already back in the queue before the kill
