from __future__ import annotations

from django.conf import settings
from procrastinate import JobContext
from procrastinate.contrib.django import app

from jobs import queues, services


@app.periodic(cron=settings.STALLED_JOBS_CRON, periodic_id="retry-stalled-jobs")
@app.task(
    name="jobs.retry_stalled",
    queue=queues.MAINTENANCE,
    queueing_lock="jobs.retry_stalled",
    pass_context=True,
)
async def retry_stalled_jobs(context: JobContext, timestamp: int) -> list[int]:
    return await services.jobs_retry_stalled(
        job_manager=context.app.job_manager,
        seconds_since_heartbeat=settings.WORKER_STALLED_SECONDS,
    )
