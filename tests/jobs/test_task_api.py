"""What a task can do: report progress, return a result, be deduplicated (jobs/tasking/progress.py,
jobs/engine/middleware.py, jobs/tasking/defer.py job_defer)."""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.utils import timezone
from procrastinate.contrib.django import app

from jobs.console import services
from jobs.models import JobInfo
from jobs.tasking.defer import job_defer
from tests.factories import make_user
from tests.helpers import database_url, jobs, run_worker, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_attempts, job_status, query, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)

_INFO = "SELECT processed, total, progress, progress_at, owner_id FROM jobs_job_info WHERE job_id = %s"


def _info_elsewhere(job_id: int) -> tuple | None:
    """The job's info row, read on a fresh connection of its own (as a web process would)."""
    with psycopg.connect(database_url(), autocommit=True) as other:
        return other.execute(_INFO, [job_id]).fetchone()


# --- Progress -------------------------------------------------------------------------------


def test_progress_is_visible_from_another_connection_while_the_job_runs_and_survives_sigkill(tmp_path):
    owner = make_user("pia")
    release = tmp_path / "release"
    job_id = job_defer(tasks.progress_then_wait, owner_id=owner.id, release_path=str(release), total=10)

    worker = start_test_worker("--queues", tasks.QUEUE_A)
    try:
        row = wait_for(
            lambda: (info := _info_elsewhere(job_id)) and info[0] == 3 and info,
            what="the first progress report",
        )
        processed, total, progress, progress_at, owner_id = row
        assert (processed, total, progress, owner_id) == (3, 10, {"stage": "halfway"}, owner.id)
        assert progress_at is not None
        assert job_status(job_id) == "doing"  # reported mid-run, not at the end

        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        release.touch()
        output = stop_worker(worker)

    # The worker is gone mid-job; what it reported is still there for anyone to read.
    assert _info_elsewhere(job_id)[:3] == (3, 10, {"stage": "halfway"}), output
    assert job_status(job_id) == "doing"  # until the stalled-job rescue puts it back


def test_a_watched_job_notifies_its_status_and_progress_on_its_channel():
    job_id = job_defer(tasks.stamp_a, owner_id=make_user("wes").id, n=7)
    JobInfo.objects.filter(job_id=job_id).update(watched=True)

    with psycopg.connect(database_url(), autocommit=True) as listener:
        listener.execute(f"LISTEN secondbrain_job_{job_id}")
        run_worker([tasks.QUEUE_A])
        received = [json.loads(n.payload) for n in listener.notifies(timeout=2.0, stop_after=3)]

    assert received == [
        {"type": "status", "status": "doing"},
        {"type": "progress", "processed": 7, "total": None, "data": {}},
        {"type": "status", "status": "succeeded"},
    ]


def test_an_unwatched_job_sends_no_notification():
    job_id = job_defer(tasks.stamp_a, owner_id=make_user("una").id, n=1)
    with psycopg.connect(database_url(), autocommit=True) as listener:
        listener.execute(f"LISTEN secondbrain_job_{job_id}")
        run_worker([tasks.QUEUE_A])
        assert list(listener.notifies(timeout=0.5)) == []
    assert job_status(job_id) == "succeeded"


# --- Results --------------------------------------------------------------------------------


def test_the_returned_value_is_stored_with_its_expiry_and_dropped_by_the_purge_once_expired():
    job_id = job_defer(tasks.echo, owner_id=make_user("rui").id, value=[1, "two", {"three": 3}])
    run_worker([tasks.QUEUE_A])

    info = JobInfo.objects.get(job_id=job_id)
    assert job_status(job_id) == "succeeded"
    assert info.result == {"echo": [1, "two", {"three": 3}]}
    # tests.echo keeps its result for result_ttl=60 s (the default is JOBS_RESULT_TTL_SECONDS).
    assert timezone.now() + timedelta(seconds=50) < info.result_expires_at < timezone.now() + timedelta(seconds=70)
    assert info.error == ""

    assert services.jobs_purge()["expired_results"] == 0
    assert JobInfo.objects.get(job_id=job_id).result is not None

    query("UPDATE jobs_job_info SET result_expires_at = now() - interval '1 second' WHERE job_id = %s", [job_id])
    assert services.jobs_purge()["expired_results"] == 1
    info = JobInfo.objects.get(job_id=job_id)
    assert (info.result, info.result_expires_at) == (None, None)
    assert job_status(job_id) == "succeeded"  # the job itself is kept for its own retention


def test_a_result_is_stored_even_for_a_job_deferred_without_owner(settings):
    settings.JOBS_RESULT_TTL_SECONDS = 3600
    job_id = tasks.echo.defer(value="plain")  # no job_defer: no info row until the result
    run_worker([tasks.QUEUE_A])
    info = JobInfo.objects.get(job_id=job_id)
    assert info.result == {"echo": "plain"}
    assert info.owner_id is None


def test_a_failure_stores_its_error_and_a_permanent_error_is_not_retried():
    job_id = job_defer(tasks.fail_permanently, owner_id=make_user("fay").id, reason="bad input file")
    run_worker([tasks.QUEUE_A])
    assert job_status(job_id) == "failed"
    assert job_attempts(job_id) == 1  # retries=3, but a permanent error ends the job at once
    info = JobInfo.objects.get(job_id=job_id)
    assert info.error == "ProviderError: bad input file"
    assert info.result is None


# --- Deduplication --------------------------------------------------------------------------


def test_a_second_defer_inside_the_window_returns_the_first_job():
    first = job_defer(tasks.stamp_a, dedup_key="import:42", dedup_seconds=60, n=1)
    second = job_defer(tasks.stamp_a, dedup_key="import:42", dedup_seconds=60, n=2)
    other = job_defer(tasks.stamp_a, dedup_key="import:43", dedup_seconds=60, n=3)

    assert second == first
    assert other != first
    assert [job["args"] for job in jobs("tests.stamp_a")] == [{"n": 1}, {"n": 3}]


def test_the_window_holds_whatever_the_first_job_became():
    first = job_defer(tasks.stamp_a, dedup_key="report", dedup_seconds=60, n=1)
    run_worker([tasks.QUEUE_A])
    assert job_status(first) == "succeeded"
    assert job_defer(tasks.stamp_a, dedup_key="report", dedup_seconds=60, n=2) == first


def test_after_the_window_a_new_job_is_created():
    first = job_defer(tasks.stamp_a, dedup_key="import:42", dedup_seconds=60, n=1)
    query("UPDATE jobs_job_info SET dedup_until = now() - interval '1 second' WHERE job_id = %s", [first])

    second = job_defer(tasks.stamp_a, dedup_key="import:42", dedup_seconds=60, n=2)
    assert second != first
    assert len(jobs("tests.stamp_a")) == 2
    # ... and it opens a window of its own.
    assert job_defer(tasks.stamp_a, dedup_key="import:42", dedup_seconds=60, n=3) == second


def test_a_rolled_back_defer_leaves_no_job_and_no_window():
    with pytest.raises(RuntimeError), transaction.atomic():
        job_defer(tasks.stamp_a, dedup_key="k", dedup_seconds=60, n=1)
        raise RuntimeError("the caller's write failed")
    assert jobs("tests.stamp_a") == []
    job_id = job_defer(tasks.stamp_a, dedup_key="k", dedup_seconds=60, n=2)
    assert [job["id"] for job in jobs("tests.stamp_a")] == [job_id]


def test_dedup_needs_a_window():
    with pytest.raises(ValueError, match="dedup_seconds"):
        job_defer(tasks.stamp_a, dedup_key="k", n=1)
    assert jobs("tests.stamp_a") == []


def test_two_concurrent_defers_with_one_key_create_one_job():
    """The first defer's transaction is still open when the second starts: without the advisory
    lock the second would not see the first's uncommitted row and create a second job."""
    first_deferred = threading.Event()
    results: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def slow_caller() -> None:
        try:
            with transaction.atomic():
                results["first"] = job_defer(tasks.stamp_a, dedup_key="race", dedup_seconds=60, n=1)
                first_deferred.set()
                time.sleep(0.5)  # the caller's transaction goes on: other writes, say
        except BaseException as exc:
            errors.append(exc)
        finally:
            first_deferred.set()
            connection.close()

    def racing_caller() -> None:
        try:
            first_deferred.wait(10)
            results["second"] = job_defer(tasks.stamp_a, dedup_key="race", dedup_seconds=60, n=2)
            results["second_done_at"] = time.monotonic()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=slow_caller), threading.Thread(target=racing_caller)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert errors == []
    assert results["second"] == results["first"] is not None
    assert results["second_done_at"] - started >= 0.4  # it waited for the first transaction
    assert len(jobs("tests.stamp_a")) == 1


# --- Abort ----------------------------------------------------------------------------------


def test_an_operators_abort_stops_a_job_at_its_next_progress_report():
    job_id = job_defer(tasks.long_cooperative, owner_id=make_user("abe").id, seconds=30)
    worker = start_test_worker("--queues", tasks.QUEUE_A)
    try:
        wait_for(lambda: (info := _info_elsewhere(job_id)) and info[0] is not None, what="the job to run")
        assert app.job_manager.cancel_job_by_id(job_id, abort=True)
        wait_for(lambda: job_status(job_id) == "aborted", timeout=10, what="the abort")
    finally:
        output = stop_worker(worker)
    assert job_attempts(job_id) == 1, output  # not retried: an abort on request is final
    assert JobInfo.objects.get(job_id=job_id).error == "aborted on request"
