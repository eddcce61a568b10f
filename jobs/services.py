"""Writes to the job system: deferring inside the caller's transaction, rescuing stalled jobs."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import transaction
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate.manager import JobManager
from procrastinate.tasks import Task

logger = logging.getLogger(__name__)


def job_defer(
    task: Task,
    *,
    queueing_lock: str | None = None,
    lock: str | None = None,
    priority: int | None = None,
    schedule_at: datetime | None = None,
    **task_kwargs: Any,
) -> int | None:
    """Defer `task` on the current database connection, so inside the caller's transaction.

    A rolled-back transaction leaves no job; a committed one always has it. With a
    `queueing_lock`, a job that is already waiting with the same lock makes this a no-op
    (returns None): that waiting job reads the latest rows when it runs. Jobs sharing a
    `lock` never run at the same time.
    """
    try:
        # A savepoint, so a refused duplicate does not abort the caller's transaction.
        with transaction.atomic():
            options = {"queueing_lock": queueing_lock, "lock": lock, "priority": priority, "schedule_at": schedule_at}
            return task.configure(**{k: v for k, v in options.items() if v is not None}).defer(**task_kwargs)
    except procrastinate_exceptions.AlreadyEnqueued:
        return None


async def jobs_retry_stalled(*, job_manager: JobManager, seconds_since_heartbeat: float) -> list[int]:
    """Put back to `todo` the jobs held by workers that stopped heartbeating (e.g. SIGKILL)."""
    stalled = await job_manager.get_stalled_jobs(seconds_since_heartbeat=seconds_since_heartbeat)
    retried = []
    for job in stalled:
        assert job.id is not None
        await job_manager.retry_job(job)
        retried.append(job.id)
    if retried:
        logger.warning("Retried %d stalled job(s): %s", len(retried), retried)
    return retried
