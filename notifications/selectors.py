from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import Count, Exists, OuterRef, Prefetch, Q, QuerySet, Sum
from django.utils import timezone

from notifications.models import DeliveryCounter, DeliveryLog, NotificationJob, Recipient, Status


def recipient_list(*, owner: AbstractBaseUser) -> QuerySet[Recipient]:
    return Recipient.objects.filter(owner=owner)


def notification_list(*, owner: AbstractBaseUser) -> QuerySet[NotificationJob]:
    return NotificationJob.objects.filter(owner=owner).select_related("recipient")


def notification_detail_queryset(*, owner: AbstractBaseUser) -> QuerySet[NotificationJob]:
    return notification_list(owner=owner).prefetch_related(
        Prefetch("delivery_logs", queryset=DeliveryLog.objects.order_by("created_at", "id"))
    )


# Processing time: from when the job was due (created, or scheduled for later) to done.
_PROCESSING_TIME_SQL = """
SELECT avg(d) * 1000, percentile_cont(0.95) WITHIN GROUP (ORDER BY d) * 1000
  FROM (SELECT EXTRACT(EPOCH FROM processed_at - GREATEST(created_at, COALESCE(scheduled_for, created_at))) AS d
          FROM notification_jobs
         WHERE owner_id = %s AND created_at >= %s AND processed_at IS NOT NULL
           AND status IN ('sent', 'failed')) AS finished
"""


def notification_metrics(*, owner: AbstractBaseUser, hours: int) -> dict:
    now = timezone.now()
    since = now - timedelta(hours=hours)
    counts = (
        NotificationJob.objects.filter(owner=owner, created_at__gte=since)
        .values_list("status", "delivery_method")
        .annotate(count=Count("id"))
        .order_by()
    )
    by_status = {s: 0 for s in Status.values}
    by_method: dict[str, dict[str, int]] = {}
    for job_status, method, count in counts:
        by_status[job_status] += count
        by_method.setdefault(method, {})[job_status] = count
    with connection.cursor() as cursor:
        cursor.execute(_PROCESSING_TIME_SQL, [owner.pk, since])
        avg_ms, p95_ms = cursor.fetchone()
    finished = by_status[Status.SENT] + by_status[Status.FAILED]
    failed = NotificationJob.objects.filter(owner=owner, created_at__gte=since, status=Status.FAILED)
    recent_failures = [
        {"id": n.id, "recipient_id": n.recipient_id, "error": n.error, "processed_at": n.processed_at}
        for n in failed.order_by("-processed_at")[:10]
    ]
    overdue = NotificationJob.objects.filter(
        owner=owner, status=Status.PENDING, scheduled_for__lt=now - timedelta(minutes=1)
    ).count()
    return {
        "hours": hours,
        "total": sum(by_status.values()),
        "by_status": by_status,
        "success_rate": round(by_status[Status.SENT] / finished, 4) if finished else None,
        "processing_time_ms": {
            "avg": round(avg_ms, 1) if avg_ms is not None else None,
            "p95": round(p95_ms, 1) if p95_ms is not None else None,
        },
        "by_delivery_method": by_method,
        "recent_failures": recent_failures,
        "overdue": overdue,
    }


def notification_health() -> dict:
    """System-wide view for /api/health/: failure rate over 15 minutes and the due backlog."""
    now = timezone.now()
    recent = NotificationJob.objects.filter(processed_at__gte=now - timedelta(minutes=15))
    sent = recent.filter(status=Status.SENT).count()
    failed = recent.filter(status=Status.FAILED).count()
    backlog = NotificationJob.objects.filter(
        Q(scheduled_for__isnull=True) | Q(scheduled_for__lte=now), status=Status.PENDING
    ).count()
    return {
        "sent_15m": sent,
        "failed_15m": failed,
        "failure_rate_15m": round(failed / (sent + failed), 4) if sent + failed else 0.0,
        "backlog": backlog,
    }


# --- For /metrics: each costs a few rows however large the tables grow ----------------------
# The statuses a notification waits or runs in: few at any time, so counting them exactly is
# cheap (notif_status_sched_idx leads with status). Finished ones are counted as delivery outcomes.
UNFINISHED_STATUSES = (Status.PENDING, Status.PROCESSING)


def delivery_counts_by_outcome() -> dict[str, int]:
    """Delivery logs ever written, by outcome: the trigger-kept counters (migration 0005), so
    purged logs still count."""
    rows = DeliveryCounter.objects.values_list("outcome").annotate(n=Sum("count")).order_by()
    return {outcome: int(n) for outcome, n in rows}


def delivery_counts_by_every_outcome() -> dict[str, int]:
    """delivery_counts_by_outcome with a 0 for each outcome never logged, in the model's order."""
    counts = delivery_counts_by_outcome()
    return {outcome: counts.get(outcome, 0) for outcome in DeliveryLog.Outcome.values}


def notification_counts_unfinished() -> dict[str, int]:
    rows = (
        NotificationJob.objects.filter(status__in=UNFINISHED_STATUSES)
        .values_list("status")
        .annotate(n=Count("id"))
        .order_by()
    )
    counts = dict(rows)
    return {status: counts.get(status, 0) for status in UNFINISHED_STATUSES}


def notifications_sent_unconfirmed() -> QuerySet[NotificationJob]:
    """E-mails marked `sent` whose server reply is not on record: the worker died after its
    commit point and before writing the delivery log. Nearly all of them were delivered (the dot
    left); one killed in the microseconds between the COMMIT and the dot was not (see
    docs/reliability.md). Its Message-ID (`provider_message_id`) is what to look for in the mail
    server's log. Only rows whose logs retention has not deleted yet."""
    since = timezone.now() - timedelta(days=settings.NOTIFICATIONS_DELIVERY_LOG_RETENTION_DAYS)
    confirmed = DeliveryLog.objects.filter(notification=OuterRef("pk"), outcome=DeliveryLog.Outcome.SENT)
    return NotificationJob.objects.filter(status=Status.SENT, processed_at__gte=since).exclude(Exists(confirmed))
