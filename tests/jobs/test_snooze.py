"""Snooze (`raise JobSnooze(seconds=...)`, jobs/tasking/snooze.py) with real workers: the job runs
again later on the database's clock without spending an attempt, can then succeed, is capped by
its task's max_snoozes, and behaves with a lock and a queueing lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import JobSnooze, SnoozeLimitExceeded, job_defer
from jobs.tasking.snooze import MAX_SNOOZE_SECONDS
from tests.helpers import run_worker, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_attempts, job_events, job_status, query, retry_delay, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)


def snoozes(job_id: int) -> int:
    rows = query("SELECT snoozes FROM jobs_job_info WHERE job_id = %s", [job_id])
    return rows[0][0] if rows else 0


def due(job_id: int) -> bool:
    return query("SELECT coalesce(scheduled_at <= now(), true) FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0]


@pytest.mark.parametrize("seconds", [0, -1, MAX_SNOOZE_SECONDS + 1])
def test_a_snooze_takes_a_positive_bounded_number_of_seconds(seconds):
    with pytest.raises(ValueError, match="more than 0 and at most"):
        JobSnooze(seconds=seconds)


def test_a_snooze_takes_a_number():
    with pytest.raises(TypeError):
        JobSnooze(seconds="30")


def test_a_snoozed_job_keeps_its_attempts_runs_later_on_the_database_clock_and_succeeds(tmp_path, user):
    marker = str(tmp_path / "snoozed")
    job_id = job_defer(tasks.snooze_once, owner_id=user.pk, marker=marker, seconds=30)
    run_worker(queues=[tasks.QUEUE_A])

    assert Path(marker).exists()
    assert job_status(job_id) == "todo" and job_attempts(job_id) == 0
    assert 29.0 <= retry_delay(job_id) <= 30.5  # scheduled_at - the decision's event, both the database's
    assert snoozes(job_id) == 1
    assert job_events(job_id)[-2:] == ["deferred_for_retry", "scheduled"]

    query("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE id = %s", [job_id])  # not wait 30 s
    run_worker(queues=[tasks.QUEUE_A])
    assert job_status(job_id) == "succeeded"
    reference = job_defer(tasks.echo, value=1)  # a job that never snoozed, for the attempts it ends with
    run_worker(queues=[tasks.QUEUE_A])
    assert job_attempts(job_id) == job_attempts(reference)


def test_the_jobs_api_shows_the_snooze(tmp_path, api, user):
    job_id = job_defer(tasks.snooze_once, owner_id=user.pk, marker=str(tmp_path / "m"), seconds=60)
    run_worker(queues=[tasks.QUEUE_A])
    detail = api.get(f"/api/jobs/{job_id}/").json()
    assert (detail["snoozes"], detail["attempts"], detail["status"]) == (1, 0, "scheduled")
    # The timeline is in time order: the snooze's `scheduled` event is stamped with when it is due.
    types = [event["type"] for event in detail["timeline"]]
    after_run = types[types.index("started") + 1 :]
    assert after_run[0] == "deferred_for_retry" and after_run[-1] == "scheduled", types
    retried_at = next(e["at"] for e in detail["timeline"] if e["type"] == "deferred_for_retry")
    assert detail["timeline"][-1]["at"] > retried_at  # due 60 s after the snooze
    assert detail["error"] is None


def test_a_task_that_snoozes_forever_fails_past_its_max_snoozes(user):
    job_id = job_defer(tasks.snooze_forever, owner_id=user.pk, seconds=0.1)

    def ended() -> bool:
        if due(job_id):
            run_worker(queues=[tasks.QUEUE_A])
        return job_status(job_id) == "failed"

    wait_for(ended, what="the job to fail")
    assert snoozes(job_id) == 3  # max_snoozes=2: the third snooze fails it
    error = query("SELECT error FROM jobs_job_info WHERE job_id = %s", [job_id])[0][0]
    assert error == "tests.snooze_forever snoozed 3 times, more than its max_snoozes (2)"
    assert issubclass(SnoozeLimitExceeded, Exception) and SnoozeLimitExceeded.permanent


def test_a_snoozed_job_with_a_lock_keeps_its_place_in_the_lock_order(tmp_path):
    # Procrastinate runs the jobs of a lock in order: a snoozed job, like a retried one, stays first.
    snoozed = job_defer(tasks.snooze_once, lock="snooze-lock", marker=str(tmp_path / "m"), seconds=1)
    run_worker(queues=[tasks.QUEUE_A])
    assert job_status(snoozed) == "todo"

    after = job_defer(tasks.echo, lock="snooze-lock", value="after")
    run_worker(queues=[tasks.QUEUE_A])
    assert (job_status(snoozed), job_status(after)) == ("todo", "todo")  # waits behind it, not beside it

    wait_for(lambda: due(snoozed), what="the snooze to be over")
    run_worker(queues=[tasks.QUEUE_A])
    assert (job_status(snoozed), job_status(after)) == ("succeeded", "succeeded")
    ended = query("SELECT at FROM procrastinate_events WHERE job_id = %s AND type = 'succeeded'", [snoozed])[0][0]
    started = query("SELECT at FROM procrastinate_events WHERE job_id = %s AND type = 'started'", [after])[0][0]
    assert started >= ended


def test_a_snooze_while_a_newer_job_of_its_queueing_lock_waits_is_superseded_by_it(tmp_path):
    release = tmp_path / "release"
    marker = str(tmp_path / "m")
    first = job_defer(tasks.snooze_once, queueing_lock="snooze-q", marker=marker, seconds=60, release_path=str(release))
    worker = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "1")
    try:
        wait_for(lambda: job_status(first) == "doing", what="the first job running")
        second = job_defer(tasks.snooze_once, queueing_lock="snooze-q", marker=marker, seconds=60)
        release.write_text("go")
        wait_for(lambda: job_status(second) == "succeeded", what="the waiting job to run")
    finally:
        output = stop_worker(worker)
    assert job_status(first) == "cancelled", output
    error = query("SELECT error FROM jobs_job_info WHERE job_id = %s", [first])[0][0]
    assert error.startswith(f"Superseded by job {second}"), error
    assert "UniqueViolation" not in output and "unique" not in output.lower(), output
