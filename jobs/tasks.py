from __future__ import annotations

from django.conf import settings
from procrastinate import JobContext

from jobs.console import services
from jobs.tasking import queues
from jobs.tasking.registry import job_task

# Above every other job: workers claim the highest priority first, so at the default priority a
# backlog of e-mails would keep the jobs of a dead worker waiting until the backlog had drained.
RESCUE_PRIORITY = 1000


@job_task(
    name="jobs.retry_stalled",
    queue=queues.MAINTENANCE,
    cron=settings.STALLED_JOBS_CRON,
    periodic_id="retry-stalled-jobs",
    queueing_lock="jobs.retry_stalled",
    pass_context=True,
    priority=RESCUE_PRIORITY,
)
async def retry_stalled_jobs(context: JobContext, timestamp: int) -> dict[str, list]:
    return await services.jobs_retry_stalled(
        job_manager=context.app.job_manager,
        seconds_since_heartbeat=settings.WORKER_STALLED_SECONDS,
    )


@job_task(
    name="jobs.purge",
    queue=queues.MAINTENANCE,
    cron=settings.JOBS_RETENTION_CRON,
    periodic_id="purge-finished-jobs",
    queueing_lock="jobs.purge",
)
def purge_finished_jobs(timestamp: int | None = None) -> dict[str, int]:
    return services.jobs_purge()


# Deferred by the database when a job with a callback URL ends (see jobs/tasking/webhooks.py), on the
# `webhooks` queue (the trigger names it, migration 0006). Each POST has its own total deadline;
# the time limit is the backstop for everything around it (the database, a stuck lookup thread).
@job_task(
    name="jobs.webhook_deliver",
    queue=queues.WEBHOOKS,
    retries=5,
    retry_base_seconds=2,
    time_limit=settings.JOBS_WEBHOOK_TIMEOUT_SECONDS + 10,
    pass_context=True,
)
def webhook_deliver(context: JobContext, *, job_id: int, status: str) -> int:
    return services.webhook_deliver(job_id=job_id, status=status, delivery_id=context.job.id)
