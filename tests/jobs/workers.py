"""Helpers for the job-layer tests: worker processes that know the test-only tasks, and reads
of Procrastinate's tables."""

from __future__ import annotations

import subprocess
from datetime import datetime

from django.db import connection

from tests.helpers import start_worker_process, wait_for
from tests.jobs.tasks_for_tests import WORKER_ENV


def start_test_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`manage.py procrastinate worker ARGS` that also imports tests/jobs/tasks_for_tests.py."""
    return start_worker_process(*args, env={**WORKER_ENV, **(env or {})})


def wait_for_workers(count: int, *, timeout: float = 30.0) -> None:
    """Until `count` worker processes have registered (they then listen and fetch)."""
    wait_for(
        lambda: query("SELECT count(*) FROM procrastinate_workers")[0][0] >= count, timeout=timeout, what="workers"
    )


def wait_for_listeners(count: int, *, timeout: float = 30.0) -> None:
    """Until `count` sessions of this database have run their LISTEN: a worker registers its row
    and opens its LISTEN connection concurrently, so a job deferred once the rows are there may
    NOTIFY before a worker listens (and a worker that polls rarely would then miss it)."""
    wait_for(
        lambda: (
            query(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN %%'"
            )[0][0]
            >= count
        ),
        timeout=timeout,
        what="LISTEN connections",
    )


def query(sql: str, params: list | dict | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def job_status(job_id: int) -> str:
    return query("SELECT status FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0]


def job_attempts(job_id: int) -> int:
    return query("SELECT attempts FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0]


def job_events(job_id: int) -> list[str]:
    return [row[0] for row in query("SELECT type FROM procrastinate_events WHERE job_id = %s ORDER BY id", [job_id])]


def event_times(job_id: int, event_type: str) -> list[datetime]:
    rows = query(
        "SELECT at FROM procrastinate_events WHERE job_id = %s AND type = %s ORDER BY id", [job_id, event_type]
    )
    return [row[0] for row in rows]


def retry_delay(job_id: int) -> float:
    """Seconds between a job's last retry decision and the time it was put back for: measured
    on the database's clock from the `deferred_for_retry` event, so a slow machine between the
    decision and this read does not shorten it."""
    return query(
        "SELECT extract(epoch FROM job.scheduled_at - event.at)::float FROM procrastinate_jobs AS job"
        " CROSS JOIN LATERAL (SELECT at FROM procrastinate_events WHERE job_id = job.id"
        "                      AND type = 'deferred_for_retry' ORDER BY id DESC LIMIT 1) AS event"
        " WHERE job.id = %s",
        [job_id],
    )[0][0]
