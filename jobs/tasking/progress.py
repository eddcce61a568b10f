"""What a running task reports about itself: progress now, and whether it should stop.

    from jobs.tasking.progress import job_progress

    def note_import(context, *, import_id):
        for batch in batches:
            ...
            job_progress(context, processed=n, total=total, imported=i, skipped=s)

Progress is a row in PostgreSQL (`jobs_job_info`), committed at once: it survives a worker
restart and any web process reads it. A client streaming the job gets it via NOTIFY.
"""

from __future__ import annotations

import json
from typing import Any

from django.db import connection
from procrastinate import JobContext
from procrastinate.exceptions import JobAborted
from procrastinate.job_context import AbortReason

# One round trip: write the progress, NOTIFY only when a client streams this job, and read
# whether an operator asked the job to stop.
_PROGRESS = """
WITH written AS (
    INSERT INTO jobs_job_info (job_id, processed, total, progress, progress_at)
    VALUES (%(job_id)s, %(processed)s, %(total)s, %(data)s::jsonb, now())
    ON CONFLICT (job_id) DO UPDATE SET processed = EXCLUDED.processed, total = EXCLUDED.total,
                                       progress = EXCLUDED.progress, progress_at = EXCLUDED.progress_at
    RETURNING watched
), notified AS (
    SELECT pg_notify('secondbrain_job_' || %(job_id)s, %(event)s) FROM written WHERE watched
)
SELECT (SELECT count(*) FROM notified) AS notified,
       (SELECT abort_requested OR status = 'aborted' FROM procrastinate_jobs WHERE id = %(job_id)s) AS aborted
"""


def job_progress(context: JobContext, *, processed: int, total: int | None = None, **data: Any) -> None:
    """Record how far the job is (`processed` of `total`, plus a small JSON dict).

    Call it from a task's own code, outside any transaction of the task's (it commits at once).
    Raises JobAborted when the job has been asked to stop (an operator's abort, or the worker
    shutting down past its grace period), so a long task stops at its next report.
    """
    if context.should_abort():
        raise JobAborted(f"job {context.job.id} aborted ({context.abort_reason()})")
    payload = json.dumps(data)
    event = json.dumps({"type": "progress", "processed": processed, "total": total, "data": data})
    with connection.cursor() as cursor:
        cursor.execute(
            _PROGRESS,
            {"job_id": context.job.id, "processed": processed, "total": total, "data": payload, "event": event},
        )
        aborted = cursor.fetchone()[1]
    # The worker forgets an operator's abort once the middleware has given the job up, but a
    # sync task's thread runs on: the job's row still says so.
    if aborted:
        raise JobAborted(f"job {context.job.id} aborted ({AbortReason.USER_REQUEST})")


async def job_progress_async(context: JobContext, *, processed: int, total: int | None = None, **data: Any) -> None:
    """`job_progress` for an async task (`async def`): the same row and NOTIFY, written through
    the worker's own connection pool instead of Django's (which async code may not use)."""
    if context.should_abort():
        raise JobAborted(f"job {context.job.id} aborted ({context.abort_reason()})")
    event = json.dumps({"type": "progress", "processed": processed, "total": total, "data": data})
    await context.app.connector.execute_query_async(
        _PROGRESS, job_id=context.job.id, processed=processed, total=total, data=json.dumps(data), event=event
    )
