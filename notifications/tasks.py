from __future__ import annotations

from procrastinate import JobContext
from procrastinate.contrib.django import app

from core.errors import ProviderError
from jobs import queues
from jobs.retry import backoff, will_retry
from notifications import services


@app.task(
    name="notifications.deliver",
    queue=queues.NOTIFICATIONS,
    retry=backoff(retries=2, base_seconds=2),  # 3 attempts, waiting about 2 s then 4 s
    pass_context=True,
)
def notification_deliver(context: JobContext, *, notification_id: int) -> str:
    attempt = context.job.attempts + 1
    try:
        return services.notification_deliver(notification_id=notification_id, attempt=attempt)
    except ProviderError as exc:
        services.notification_attempt_failed(
            notification_id=notification_id, error=str(exc), final=not will_retry(context, exc)
        )
        raise
