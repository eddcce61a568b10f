"""Reads of the job system's own tables (Procrastinate's), for health and operations."""

from __future__ import annotations

from collections import defaultdict

from django.db import connection


def job_counts_by_queue() -> dict[str, dict[str, int]]:
    """{queue: {status: count}} over every job row."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT queue_name, status, count(*) FROM procrastinate_jobs GROUP BY 1, 2 ORDER BY 1, 2")
        counts: dict[str, dict[str, int]] = defaultdict(dict)
        for queue, job_status, count in cursor.fetchall():
            counts[queue][job_status] = count
    return dict(counts)


def live_workers(*, stalled_after_seconds: float) -> list[dict]:
    """Workers whose last heartbeat is recent enough to count them alive."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, last_heartbeat FROM procrastinate_workers"
            " WHERE last_heartbeat >= now() - make_interval(secs => %s) ORDER BY id",
            [stalled_after_seconds],
        )
        return [{"id": wid, "last_heartbeat": beat} for wid, beat in cursor.fetchall()]
