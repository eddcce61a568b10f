from __future__ import annotations

from collections import Counter

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


@job_task(
    name="notifications.deliver_many",
    queue=queues.NOTIFICATIONS,
    retries=2,  # a re-run (after a crash, say) sends only what is not sent yet
    retry_base_seconds=2,
    pass_context=True,
)
def notifications_deliver_many(context: JobContext, *, notification_ids: list[int]) -> dict[str, int]:
    """One owner's e-mails of a bulk send, one after the other on one SMTP session: one claim
    and one end in the queue for up to NOTIFICATIONS_BATCH_SIZE e-mails. Each is delivered as
    notifications.deliver delivers it (at most once, its own claim and delivery log) and fails
    on its own: a transient failure hands it to a notifications.deliver job of its own, which
    counts its attempts on from this one's, and the rest go on. Returns the count of each outcome."""
    attempt = context.job.attempts + 1
    outcomes: Counter[str] = Counter()
    for notification_id in notification_ids:
        try:
            outcomes[services.notification_deliver(notification_id=notification_id, attempt=attempt)] += 1
        except ProviderError as exc:
            # The decision notifications.deliver would take after this attempt.
            decision = notification_deliver.retry_strategy.get_retry_decision(
                exception=exc, job=context.job.evolve(attempts=attempt - 1)
            )
            if decision is None:
                services.notification_attempt_failed(notification_id=notification_id, error=exc.detail, final=True)
                outcomes["failed"] += 1
            else:
                services.notification_hand_over(
                    notification_id=notification_id, error=exc.detail, attempts=attempt, retry_at=decision.retry_at
                )
                outcomes["retrying"] += 1
    return dict(outcomes)
