from __future__ import annotations

from django.conf import settings
from procrastinate.contrib.django import app

from core import services
from jobs import job_task, queues


@app.periodic(cron=settings.JOBS_RETENTION_CRON, periodic_id="purge-expired-rows")
@job_task(name="core.purge_expired", queue=queues.MAINTENANCE, queueing_lock="core.purge_expired")
def purge_expired_rows(timestamp: int | None = None) -> dict[str, int]:
    return services.expired_rows_purge()
