"""Retention: `jobs_purge` deletes finished jobs past their queue's retention, in batches, with
their events and info rows, and never touches waiting or running jobs."""

from __future__ import annotations

import pytest

from jobs.console import services
from jobs.models import JobInfo
from jobs.tasking.defer import job_defer, job_defer_bulk
from tests.factories import make_user
from tests.helpers import job_move
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import query

pytestmark = pytest.mark.django_db

HOUR = 3600
DAY = 24 * HOUR


def _job(status: str, *, age_seconds: float, queue: str = tasks.QUEUE_A, owner=None) -> int:
    """A job of `queue` in `status`, whose every event happened `age_seconds` ago."""
    job_id = job_defer(tasks.stamp_a, owner_id=owner.id if owner else None, n=0)
    if queue != tasks.QUEUE_A:
        query("UPDATE procrastinate_jobs SET queue_name = %s WHERE id = %s", [queue, job_id])
    job_move(job_id, status)
    query(
        "UPDATE procrastinate_events SET at = at - make_interval(secs => %s) WHERE job_id = %s",
        [age_seconds, job_id],
    )
    return job_id


def _remaining(*job_ids: int) -> set[int]:
    return {row[0] for row in query("SELECT id FROM procrastinate_jobs WHERE id = ANY(%s)", [list(job_ids)])}


def test_finished_jobs_go_after_their_retention_and_waiting_or_running_ones_never(settings):
    settings.JOBS_SUCCEEDED_RETENTION_SECONDS = HOUR
    settings.JOBS_FAILED_RETENTION_SECONDS = 7 * DAY
    owner = make_user("otto")
    old_succeeded = _job("succeeded", age_seconds=2 * HOUR, owner=owner)
    old_cancelled = _job("cancelled", age_seconds=2 * HOUR)
    young_succeeded = _job("succeeded", age_seconds=30 * 60)
    failed_2_days = _job("failed", age_seconds=2 * DAY)
    failed_8_days = _job("failed", age_seconds=8 * DAY, owner=owner)
    aborted_8_days = _job("aborted", age_seconds=8 * DAY)
    old_todo = _job("todo", age_seconds=30 * DAY)
    old_doing = _job("doing", age_seconds=30 * DAY)
    JobInfo.objects.filter(job_id=old_succeeded).update(progress={"step": 9}, result={"ok": True})

    deleted = services.jobs_purge()

    assert deleted == {"succeeded/cancelled": 2, "failed/aborted": 2, "expired_results": 0}
    assert _remaining(
        old_succeeded,
        old_cancelled,
        young_succeeded,
        failed_2_days,
        failed_8_days,
        aborted_8_days,
        old_todo,
        old_doing,
    ) == {young_succeeded, failed_2_days, old_todo, old_doing}
    # Events and info rows went with their jobs.
    gone = [old_succeeded, failed_8_days]
    assert query("SELECT count(*) FROM procrastinate_events WHERE job_id = ANY(%s)", [gone]) == [(0,)]
    assert not JobInfo.objects.filter(job_id__in=gone).exists()
    assert JobInfo.objects.filter(job_id=old_todo).exists() is False  # it never had one
    assert query("SELECT count(*) FROM procrastinate_events WHERE job_id = %s", [young_succeeded]) == [(3,)]


def _jobs_rows_read() -> int:
    """Rows of procrastinate_jobs this transaction has read so far (scans and index fetches)."""
    return query(
        "SELECT seq_tup_read + COALESCE(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables"
        " WHERE relname = 'procrastinate_jobs'"
    )[0][0]


def test_the_purge_reads_what_it_deletes_not_the_backlog(settings):
    """With 2,000 jobs waiting, the purge starts from the finishing events by time (migration
    0015) instead of walking every job in id order (each purge run walked the whole backlog)."""
    settings.JOBS_SUCCEEDED_RETENTION_SECONDS = HOUR
    old = _job("succeeded", age_seconds=2 * HOUR)
    young = _job("succeeded", age_seconds=60)
    job_defer_bulk(tasks.stamp_a, [{"n": i} for i in range(2000)])
    query("ANALYZE procrastinate_jobs")
    query("ANALYZE procrastinate_events")
    before = _jobs_rows_read()

    assert services.jobs_purge()["succeeded/cancelled"] == 1

    assert _jobs_rows_read() - before < 50
    assert _remaining(old, young) == {young}


def test_the_last_event_counts_not_the_first(settings):
    settings.JOBS_SUCCEEDED_RETENTION_SECONDS = HOUR
    job_id = _job("succeeded", age_seconds=2 * HOUR)
    # It was deferred and started long ago, but only finished 10 minutes ago.
    query(
        "UPDATE procrastinate_events SET at = now() - interval '10 minutes' WHERE job_id = %s AND type = 'succeeded'",
        [job_id],
    )
    assert services.jobs_purge()["succeeded/cancelled"] == 0
    assert _remaining(job_id) == {job_id}


def test_per_queue_overrides(settings):
    settings.JOBS_SUCCEEDED_RETENTION_SECONDS = HOUR
    settings.JOBS_SUCCEEDED_RETENTION_BY_QUEUE = {tasks.QUEUE_B: 60, "digests": 3 * DAY}
    settings.JOBS_FAILED_RETENTION_SECONDS = 7 * DAY
    settings.JOBS_FAILED_RETENTION_BY_QUEUE = {tasks.QUEUE_B: DAY}
    short_queue = _job("succeeded", age_seconds=5 * 60, queue=tasks.QUEUE_B)
    default_queue = _job("succeeded", age_seconds=5 * 60, queue=tasks.QUEUE_A)
    long_queue = _job("succeeded", age_seconds=2 * HOUR, queue="digests")
    long_queue_expired = _job("succeeded", age_seconds=4 * DAY, queue="digests")
    failed_short_queue = _job("failed", age_seconds=2 * DAY, queue=tasks.QUEUE_B)
    failed_default_queue = _job("failed", age_seconds=2 * DAY, queue=tasks.QUEUE_A)

    services.jobs_purge()

    assert _remaining(
        short_queue, default_queue, long_queue, long_queue_expired, failed_short_queue, failed_default_queue
    ) == {default_queue, long_queue, failed_default_queue}


def test_the_purge_works_in_batches(settings):
    settings.JOBS_SUCCEEDED_RETENTION_SECONDS = HOUR
    settings.JOBS_FAILED_RETENTION_SECONDS = DAY
    succeeded = [_job("succeeded", age_seconds=2 * HOUR) for _ in range(7)]
    failed = [_job("failed", age_seconds=2 * DAY) for _ in range(3)]
    kept = _job("succeeded", age_seconds=60)

    # One batch of 2 per class: the oldest ids first, the rest left for the next run.
    assert services.jobs_purge(batch_size=2, max_batches=1) == {
        "succeeded/cancelled": 2,
        "failed/aborted": 2,
        "expired_results": 0,
    }
    assert _remaining(*succeeded, *failed) == set(succeeded[2:]) | set(failed[2:])

    # Unbounded: batches of 2 until a short batch (3 for the 5 left, 1 for the 1 left).
    assert services.jobs_purge(batch_size=2) == {"succeeded/cancelled": 5, "failed/aborted": 1, "expired_results": 0}
    assert _remaining(*succeeded, *failed, kept) == {kept}


def test_a_periodic_tasks_last_job_is_purged_too(settings):
    """`procrastinate_periodic_defers` references the latest job of each periodic task (a foreign
    key without cascade); Procrastinate's BEFORE DELETE trigger unlinks it, so the purge can go."""
    settings.JOBS_SUCCEEDED_RETENTION_SECONDS = HOUR
    job_id = _job("succeeded", age_seconds=2 * HOUR)
    query(
        "INSERT INTO procrastinate_periodic_defers (task_name, periodic_id, defer_timestamp, job_id)"
        " VALUES ('tests.stamp_a', 'every-minute', 1700000000, %s)",
        [job_id],
    )

    assert services.jobs_purge()["succeeded/cancelled"] == 1

    assert _remaining(job_id) == set()
    # The defer row stays (so that period is never deferred again), without its job.
    assert query("SELECT job_id FROM procrastinate_periodic_defers WHERE periodic_id = 'every-minute'") == [(None,)]


def test_the_periodic_purge_task_runs_the_purge(settings):
    settings.JOBS_SUCCEEDED_RETENTION_SECONDS = HOUR
    job_id = _job("succeeded", age_seconds=2 * HOUR)
    from jobs.tasks import purge_finished_jobs

    assert purge_finished_jobs(timestamp=0)["succeeded/cancelled"] == 1
    assert _remaining(job_id) == set()


def test_deleting_jobs_deletes_their_events_and_no_others():
    """A job's events go with it (migration 0019: a statement trigger, not a foreign key, whose
    check on every event written was a sixth of a bulk defer's PostgreSQL time)."""
    kept, *doomed = job_defer_bulk(tasks.stamp_a, [{"n": i} for i in range(50)])
    for job_id in (kept, *doomed):
        job_move(job_id, "succeeded")
    events = "SELECT job_id, count(*) FROM procrastinate_events GROUP BY job_id ORDER BY job_id"
    assert [count for _, count in query(events)] == [3] * 50  # deferred, started, succeeded
    query("DELETE FROM procrastinate_jobs WHERE id = ANY(%s)", [doomed])
    assert query(events) == [(kept, 3)]
    [[constraints]] = query(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'procrastinate_events'::regclass AND contype = 'f'"
    )
    assert constraints == 0  # no per-event check against the jobs
