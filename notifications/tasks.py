from __future__ import annotations

from procrastinate import JobContext

from core.errors import ProviderError
from jobs import job_task, queues, will_retry
from notifications import services


@job_task(
    name="notifications.deliver",
    queue=queues.NOTIFICATIONS,
    retries=2,  # 3 attempts, waiting about 2 s then 4 s
    retry_base_seconds=2,
    pass_context=True,
)
def notification_deliver(context: JobContext, *, notification_id: int) -> str:
    attempt = context.job.attempts + 1
    try:
        return services.notification_deliver(notification_id=notification_id, attempt=attempt)
    except ProviderError as exc:
        services.notification_attempt_failed(
            notification_id=notification_id, error=exc.detail, final=not will_retry(context, exc)
        )
        raise
