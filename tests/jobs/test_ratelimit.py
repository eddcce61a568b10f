"""Rate limits declared on a task (`RateLimit` in `job_task`), enforced by the worker middleware
through token buckets in PostgreSQL, so they hold across worker processes.

Each test task records when it ran with `job_progress` (`progress_at`, the database's clock);
the assertions count jobs per window of those timestamps, not the test's own wall clock.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from django.utils import timezone

from jobs.tasking.defer import job_defer, job_defer_bulk
from jobs.tasking.registry import RateLimit
from tests.factories import make_user
from tests.helpers import run_worker, stop_worker
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import query, start_test_worker, wait_for, wait_for_workers

pytestmark = pytest.mark.django_db(transaction=True)


def _run_times(task_name: str) -> dict[int, datetime]:
    rows = query(
        "SELECT job.id, info.progress_at FROM procrastinate_jobs AS job"
        " JOIN jobs_job_info AS info ON info.job_id = job.id WHERE job.task_name = %s",
        [task_name],
    )
    return {job_id: at for job_id, at in rows if at is not None}


def _most_in_any_window(times: list[datetime], window: float) -> int:
    """The largest number of runs that started within `window` seconds of each other."""
    times = sorted(times)
    return max(
        sum(1 for later in times[i:] if (later - first).total_seconds() < window) for i, first in enumerate(times)
    )


def _spread(times: list[datetime]) -> float:
    return (max(times) - min(times)).total_seconds()


def _finished(task_name: str, count: int) -> bool:
    rows = query("SELECT status, count(*) FROM procrastinate_jobs WHERE task_name = %s GROUP BY status", [task_name])
    return dict(rows).get("succeeded", 0) + dict(rows).get("failed", 0) >= count


def test_a_task_limit_holds_across_two_worker_processes_and_limited_jobs_wait_without_failing():
    """30 jobs of a task limited to 10/s (burst 1), two workers with 4 slots each. Every limited
    job is postponed (JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS=0) rather than waiting in place."""
    # No claim ahead: a postponement ends a job in a millisecond, so a worker would claim ahead
    # and could take every job before the other claims one (1 run in 4), and the test needs both
    # processes taking tokens to show the limit is shared (test_claim_ahead.py has that feature).
    # And each run holds its slot 0.45 s: one worker's 4 slots then run at most 8.9 jobs/s, under
    # the limit's 10, so the other worker takes jobs too even when a loaded machine starts it
    # late (one worker ran all 30 in a full suite on a loaded machine); a limit per process
    # would still let two run about 18 a second, which the spread and windows below catch.
    env = {"JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS": "0", "JOBS_CLAIM_AHEAD_MS": "0"}
    workers = [start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "4", env=env) for _ in range(2)]
    try:
        wait_for_workers(2)
        job_ids = job_defer_bulk(tasks.limited_global, [{"n": n, "sleep": 0.45} for n in range(30)])
        wait_for(lambda: _finished("tests.limited_global", 30), timeout=30, what="the 30 limited jobs")
        ran_on = query(
            "SELECT count(DISTINCT worker_id) FROM procrastinate_jobs WHERE task_name = 'tests.limited_global'"
        )
    finally:
        outputs = [stop_worker(worker) for worker in workers]

    assert ran_on == [(2,)], outputs  # both processes took jobs: the limit is shared, not per process
    rows = query(
        "SELECT status, attempts, count(*) FROM procrastinate_jobs WHERE id = ANY(%s) GROUP BY status, attempts",
        [job_ids],
    )
    # Every job succeeded, and counts one attempt: its run. Its postponements spent none.
    assert rows == [("succeeded", 1, 30)], outputs
    postponements = query(
        "SELECT count(*) FROM procrastinate_events WHERE job_id = ANY(%s) AND type = 'deferred_for_retry'", [job_ids]
    )[0][0]
    assert postponements >= 10  # the limit made jobs wait (and come back) many times

    times = list(_run_times("tests.limited_global").values())
    assert len(times) == 30
    # At 10/s with a burst of 1, 30 runs need 2.9 s whatever the number of workers.
    assert _spread(times) >= 2.5
    # In any 1 s, at most 1 (burst) + 10 (rate); +2 for the delay between taking the token and
    # the task's own timestamp. Without the limit all 30 would start within a second.
    assert _most_in_any_window(times, 1.0) <= 13
    assert _most_in_any_window(times, 0.5) <= 8


def test_a_limit_per_key_lets_each_key_progress_independently():
    """Two users' jobs of a task limited to 4/s per user_id (burst 1): each user's runs are spread
    out, yet the two users run side by side, more than one shared limit would allow."""
    env = {"JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS": "5"}  # wait in place: the limiter's timing, exactly
    worker = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "16", env=env)
    try:
        wait_for_workers(1)
        kwargs = [{"user_id": user_id, "n": n} for n in range(8) for user_id in (1, 2)]
        job_ids = job_defer_bulk(tasks.limited_per_user, kwargs)
        wait_for(lambda: _finished("tests.limited_per_user", 16), timeout=30, what="the 16 limited jobs")
    finally:
        output = stop_worker(worker)

    assert query("SELECT DISTINCT status, attempts FROM procrastinate_jobs WHERE id = ANY(%s)", [job_ids]) == [
        ("succeeded", 1)
    ], output
    times = _run_times("tests.limited_per_user")
    user_of = dict(zip(job_ids, [k["user_id"] for k in kwargs], strict=True))
    per_user = {user_id: [at for job_id, at in times.items() if user_of[job_id] == user_id] for user_id in (1, 2)}
    for user_times in per_user.values():
        assert len(user_times) == 8
        assert _spread(user_times) >= 1.4  # 8 runs at 4/s with a burst of 1 need 1.75 s
        assert _most_in_any_window(user_times, 1.0) <= 6  # 1 + 4, +1 for timestamp jitter
    # One shared 4/s limit would allow at most 5 (+1) runs in a second; two keys allow 10.
    assert _most_in_any_window(list(times.values()), 1.0) >= 8
    # And neither user waited for the other: both started at about the same time.
    assert abs((min(per_user[1]) - min(per_user[2])).total_seconds()) < 0.5


def test_a_limit_per_owner_postpones_the_owners_next_job_without_spending_its_attempt(settings):
    """1 job a minute per owner (the user the job was deferred for). In-process worker."""
    settings.JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS = 0
    ann, ben = make_user("ann"), make_user("ben")
    ids = {
        (owner.username, n): job_defer(tasks.limited_per_owner, owner_id=owner.id, n=n)
        for n in range(2)
        for owner in (ann, ben)
    }
    unowned = tasks.limited_per_owner.defer(n=9)  # no owner: outside every bucket

    run_worker([tasks.QUEUE_A])

    rows = {
        job_id: (status, attempts, scheduled_at)
        for job_id, status, attempts, scheduled_at in query(
            "SELECT id, status, attempts, scheduled_at FROM procrastinate_jobs WHERE task_name = %s",
            ["tests.limited_per_owner"],
        )
    }
    for owner in ("ann", "ben"):
        assert rows[ids[owner, 0]][:2] == ("succeeded", 1)
        status, attempts, scheduled_at = rows[ids[owner, 1]]
        assert (status, attempts) == ("todo", 0)  # postponed, not failed, no attempt spent
        assert 50 < (scheduled_at - timezone.now()).total_seconds() <= 61  # when the owner's token is due
    assert rows[unowned][:2] == ("succeeded", 1)


def test_a_job_without_a_value_for_the_key_is_not_limited():
    """`key="user_id"` limits per user; a job that has no user_id is outside every bucket."""
    limit = RateLimit(rate=1, per=60, key="user_id")
    assert limit.bucket(task_name="t", queue="q", kwargs={"user_id": 7}, owner_id=None) == "task:t:user_id=7"
    assert limit.bucket(task_name="t", queue="q", kwargs={}, owner_id=None) is None
    assert RateLimit(rate=1, key="owner").bucket(task_name="t", queue="q", kwargs={}, owner_id=3) == "task:t:owner=3"
    assert RateLimit(rate=1, scope="queue").bucket(task_name="t", queue="q", kwargs={}, owner_id=None) == "queue:q"
    with pytest.raises(ValueError):
        RateLimit(rate=0)
