"""Time limits (`job_task(time_limit=...)`): past it the job fails with TimeLimitExceeded and
follows its retry policy, and its worker slot is free at once for other jobs."""

from __future__ import annotations

import pytest

from jobs.models import JobInfo
from jobs.tasking.defer import job_defer
from tests.helpers import stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import event_times, job_attempts, job_events, job_status, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_job_past_its_time_limit_fails_is_retried_once_and_does_not_block_the_worker(tmp_path):
    """tests.over_time: time_limit=0.5, retries=1 (1 s backoff), asked to sleep 3 s. One worker
    slot (--concurrency 1), and a quick job queued behind it."""
    late = tmp_path / "late"
    slow_id = job_defer(tasks.over_time, owner_id=None, seconds=3.0, late_path=str(late))
    quick_id = job_defer(tasks.stamp_a, owner_id=None, n=1)

    worker = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "1")
    try:
        wait_for(lambda: job_status(slow_id) == "failed", timeout=20, what="the slow job to fail for good")
        assert job_status(quick_id) == "succeeded"
        # The first run's thread cannot be killed: it runs on in the background and finishes
        # its work late (which is why a time-limited task must be idempotent).
        wait_for(late.exists, timeout=10, what="the abandoned run to finish")
    finally:
        output = stop_worker(worker)

    events = [event for event in job_events(slow_id) if event != "scheduled"]  # 'scheduled': the retry's backoff
    assert events == ["deferred", "started", "deferred_for_retry", "started", "failed"], output
    assert job_attempts(slow_id) == 2  # retried once, then failed
    assert JobInfo.objects.get(job_id=slow_id).error == "TimeLimitExceeded: tests.over_time still running after 0.5 s"

    [first_start, second_start] = event_times(slow_id, "started")
    [given_up] = event_times(slow_id, "deferred_for_retry")
    [failed] = event_times(slow_id, "failed")
    # Each run was given up at about 0.5 s, not after its 3 s of sleep.
    assert (given_up - first_start).total_seconds() < 1.5
    assert (failed - second_start).total_seconds() < 1.5
    # The retry waited for its backoff (1 s).
    assert (second_start - given_up).total_seconds() >= 0.9
    # With a single slot, the quick job ran while the first run's sleep was still going on.
    quick_ran = JobInfo.objects.get(job_id=quick_id).progress_at
    assert (quick_ran - first_start).total_seconds() < 2.5
