from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from email.utils import make_msgid

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone
from procrastinate.contrib.django import app
from rest_framework import status as http

from core.errors import ApplicationError, ProviderError
from core.quotas import quota_erase, quota_take
from jobs import (
    breaker_check,
    breaker_record_failure,
    breaker_record_success,
    job_defer,
    job_defer_bulk,
    rate_limit_wait,
)
from notifications.mail import CommitPointStalled, ExactlyOnceEmail, SendAborted, delivery_log_write
from notifications.models import (
    DeliveryLog,
    DeliveryMethod,
    NotificationJob,
    NotificationType,
    Priority,
    Recipient,
    Status,
    job_priority,
)

logger = logging.getLogger(__name__)

EMAIL_BREAKER = "notifications:smtp"
EMAIL_RATE_LIMIT = "notifications:email"


# --- Recipients ----------------------------------------------------------------------------
@transaction.atomic
def recipient_create(*, owner: AbstractBaseUser, **fields) -> Recipient:
    return Recipient.objects.create(owner=owner, **fields)


@transaction.atomic
def recipient_update(*, recipient: Recipient, **fields) -> Recipient:
    for name, value in fields.items():
        setattr(recipient, name, value)
    recipient.save()
    return recipient


@transaction.atomic
def recipient_delete(*, recipient: Recipient) -> None:
    recipient.delete()


# --- Queueing ------------------------------------------------------------------------------
def _email_quota_key(owner_id: int) -> str:
    return f"email:{owner_id}"


def email_quota_take(*, owner_id: int, count: int = 1) -> None:
    """Count `count` e-mails against the owner's quota for today (UTC), all or nothing; raise 429
    with the reason and Retry-After (the end of the day) when they do not fit.

    Call inside the transaction that queues them: a request that rolls back gives them back, and
    the counter's conditional upsert keeps parallel requests from passing the quota together."""
    limit = settings.EMAIL_DAILY_QUOTA_PER_USER
    if limit <= 0 or count <= 0:
        return
    taken = quota_take(key=_email_quota_key(owner_id), amount=count, limit=limit)
    if not taken.allowed:
        left = max(limit - int(taken.used), 0)
        asked = "this e-mail" if count == 1 else f"these {count} e-mails"
        raise ApplicationError(
            f"The daily e-mail quota of {limit} per user is used up: {left} left today, not enough for"
            f" {asked}. It resets at midnight UTC, in {taken.retry_after} seconds.",
            status_code=http.HTTP_429_TOO_MANY_REQUESTS,
            extra={"retry_after": taken.retry_after},
            headers={"Retry-After": str(taken.retry_after)},
        )


def notifications_erase_owner(owner_id: int) -> None:
    """The owner's e-mail quota counters (core/erasure.py; their rows go by their foreign keys)."""
    quota_erase(key=_email_quota_key(owner_id))


def email_quota_fits(*, owner_id: int, count: int) -> bool:
    """email_quota_take for callers that skip instead of answering 429 (the digest sweep)."""
    try:
        with transaction.atomic():
            email_quota_take(owner_id=owner_id, count=count)
    except ApplicationError:
        return False
    return True


_NOTIFICATION_JOB_ID = 'UPDATE "notification_jobs" SET "procrastinate_job_id" = %s WHERE "id" = %s'


@transaction.atomic
def notification_send_email(
    *,
    owner: AbstractBaseUser,
    recipient: Recipient,
    subject: str,
    body: str,
    notification_type: str,
    priority: str,
    scheduled_for: datetime | None = None,
    callback_url: str | None = None,
) -> NotificationJob:
    """Write the notification and defer its job in one transaction; nothing waits on SMTP."""
    from notifications.tasks import notification_deliver  # tasks import services

    email_quota_take(owner_id=owner.pk)
    notification = NotificationJob.objects.create(
        owner=owner,
        recipient=recipient,
        notification_type=notification_type,
        delivery_method=DeliveryMethod.EMAIL,
        priority=priority,
        payload={"subject": subject, "body": body},
        scheduled_for=scheduled_for,
    )
    notification.procrastinate_job_id = job_defer(
        notification_deliver,
        priority=job_priority(priority, staff=owner.is_staff),
        schedule_at=scheduled_for,
        owner_id=owner.pk,
        callback_url=callback_url,
        notification_id=notification.id,
    )
    # The statement itself, not save(update_fields=...): the ORM's compiling of it cost 453 µs
    # of CPU against 111 (docs/performance.md, levers of 2026-12-08).
    with connection.cursor() as cursor:
        cursor.execute(_NOTIFICATION_JOB_ID, [notification.procrastinate_job_id, notification.id])
    return notification


# One "self" recipient per owner and address: two callbacks of one owner at once must not make two.
_SELF_RECIPIENT_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('secondbrain-self-recipient:' || %s, 0))"


@transaction.atomic
def notification_email_owner(*, owner_id: int, subject: str, body: str) -> NotificationJob | None:
    """E-mail a user about their own work (an import's completion), through the same exactly-once
    delivery as any notification. Returns the notification, or None when the user has no e-mail
    address. Call inside the transaction that records why it is sent, so it is queued once.

    The address is the user's own, as a recipient of theirs with relationship `self` (muting it
    mutes these e-mails). Not counted against the daily quota: it goes to the user alone, at most
    once per thing they did."""
    from notifications.tasks import notification_deliver  # tasks import services

    owner = get_user_model().objects.filter(pk=owner_id).first()
    if owner is None or not owner.email:
        return None
    with connection.cursor() as cursor:
        cursor.execute(_SELF_RECIPIENT_LOCK, [str(owner_id)])
    recipient = Recipient.objects.filter(owner=owner, relationship="self", email=owner.email).first()
    if recipient is None:
        recipient = Recipient.objects.create(
            owner=owner, name=owner.get_username(), email=owner.email, relationship="self"
        )
    notification = NotificationJob.objects.create(
        owner=owner,
        recipient=recipient,
        notification_type=NotificationType.SYSTEM,
        delivery_method=DeliveryMethod.EMAIL,
        priority=Priority.NORMAL,
        payload={"subject": subject, "body": body},
    )
    notification.procrastinate_job_id = job_defer(
        notification_deliver,
        priority=job_priority(Priority.NORMAL, staff=False),
        owner_id=owner.pk,
        notification_id=notification.id,
    )
    notification.save(update_fields=["procrastinate_job_id"])
    return notification


@transaction.atomic
def notification_send_bulk(
    *,
    owner: AbstractBaseUser,
    recipients: list[Recipient],
    subject: str,
    body: str,
    notification_type: str,
    priority: str,
    scheduled_for: datetime | None = None,
) -> list[int]:
    """Many recipients: one multi-row INSERT, one bulk defer, one UPDATE linking them."""
    email_quota_take(owner_id=owner.pk, count=len(recipients))
    return notifications_queue(
        [
            QueuedEmail(owner_id=owner.pk, recipient_id=recipient.pk, subject=subject, body=body)
            for recipient in recipients
        ],
        notification_type=notification_type,
        priority=priority,
        scheduled_for=scheduled_for,
        staff=owner.is_staff,
    )


@dataclass(frozen=True)
class QueuedEmail:
    owner_id: int
    recipient_id: int
    subject: str
    body: str


def notifications_queue(
    emails: list[QueuedEmail],
    *,
    notification_type: str,
    priority: str,
    scheduled_for: datetime | None = None,
    staff: bool = False,
) -> list[int]:
    """Queue many e-mails, each its own notification, in at most four statements whatever their
    number. Each owner's e-mails go in runs of up to NOTIFICATIONS_BATCH_SIZE, one
    notifications.deliver_many job per run (a notifications.deliver job for a run of one). Call
    inside the caller's transaction (the rows and their jobs commit together), after counting them
    against their owners' quotas (email_quota_take). `staff`: sent by a staff member, whose urgent
    and high e-mails go ahead of every user's (notifications.models)."""
    from notifications.tasks import notification_deliver, notifications_deliver_many  # tasks import services

    notifications = NotificationJob.objects.bulk_create(
        [
            NotificationJob(
                owner_id=email.owner_id,
                recipient_id=email.recipient_id,
                notification_type=notification_type,
                delivery_method=DeliveryMethod.EMAIL,
                priority=priority,
                payload={"subject": email.subject, "body": email.body},
                scheduled_for=scheduled_for,
            )
            for email in emails
        ]
    )
    ids = [n.id for n in notifications]
    job_of: dict[int, int] = {}
    singles, runs = _delivery_runs(ids, [email.owner_id for email in emails])
    for task, group, kwargs in (
        (notification_deliver, singles, lambda run: {"notification_id": run[0]}),
        (notifications_deliver_many, runs, lambda run: {"notification_ids": run}),
    ):
        if not group:
            continue
        job_ids = job_defer_bulk(
            task,
            [kwargs(run) for _, run in group],
            owner_id=[owner_id for owner_id, _ in group],
            priority=job_priority(priority, staff=staff),
            schedule_at=scheduled_for,
        )
        for (_, run), job_id in zip(group, job_ids, strict=True):
            job_of |= dict.fromkeys(run, job_id)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE notification_jobs n SET procrastinate_job_id = v.job_id"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, job_id) WHERE n.id = v.id",
            [ids, [job_of[i] for i in ids]],
        )
    return ids


def _delivery_runs(ids: list[int], owner_ids: list[int]) -> tuple[list[tuple[int, list[int]]], ...]:
    """Each owner's notifications in runs of up to NOTIFICATIONS_BATCH_SIZE, in their order (fair
    claims take turns by owner, so a run never mixes owners): (runs of one, longer runs)."""
    size = max(1, settings.NOTIFICATIONS_BATCH_SIZE)
    by_owner: dict[int, list[int]] = {}
    for notification_id, owner_id in zip(ids, owner_ids, strict=True):
        by_owner.setdefault(owner_id, []).append(notification_id)
    runs = [(owner, mine[i : i + size]) for owner, mine in by_owner.items() for i in range(0, len(mine), size)]
    return [r for r in runs if len(r[1]) == 1], [r for r in runs if len(r[1]) > 1]


@transaction.atomic
def notification_cancel(*, notification: NotificationJob) -> NotificationJob:
    """Cancel a notification that has not started; 409 once it runs or ran."""
    notification = NotificationJob.objects.select_for_update().get(id=notification.id)
    if notification.status != Status.PENDING:
        raise ApplicationError(
            f"This notification is {notification.status} and can no longer be cancelled.",
            status_code=http.HTTP_409_CONFLICT,
        )
    job_id = notification.procrastinate_job_id
    # A job delivering many goes on with the others and skips this one: its claim wants the row
    # pending, and waits for the row lock taken above to see it cancelled.
    if job_id is not None and not _delivers_many(job_id) and not app.job_manager.cancel_job_by_id(job_id):
        job_status = app.job_manager.get_job_status(job_id)
        if job_status.value == "doing":
            raise ApplicationError(
                "This notification is being delivered right now and can no longer be cancelled.",
                status_code=http.HTTP_409_CONFLICT,
            )
    notification.status = Status.CANCELLED
    notification.error = "cancelled by its owner"
    notification.processed_at = timezone.now()
    notification.save(update_fields=["status", "error", "processed_at"])
    return notification


def _delivers_many(job_id: int) -> bool:
    from notifications.tasks import notifications_deliver_many  # tasks import services

    return any(job.task_name == notifications_deliver_many.name for job in app.job_manager.list_jobs(id=job_id))


@transaction.atomic
def notification_retry(*, notification: NotificationJob) -> NotificationJob:
    """Re-queue a failed notification with a fresh job (and a fresh set of attempts)."""
    notification = NotificationJob.objects.select_for_update().get(id=notification.id)
    if notification.status != Status.FAILED:
        raise ApplicationError(
            f"Only failed notifications can be retried; this one is {notification.status}.",
            status_code=http.HTTP_409_CONFLICT,
        )
    email_quota_take(owner_id=notification.owner_id)  # a retry sends again
    notification.status = Status.PENDING
    notification.error = ""
    notification.procrastinate_job_id = _delivery_job(notification)
    notification.save(update_fields=["status", "error", "procrastinate_job_id"])
    return notification


# --- Delivery (called by the task) ----------------------------------------------------------


def _delivery_job(
    notification: NotificationJob, *, schedule_at: datetime | None = None, attempts: int = 0
) -> int | None:
    """A notifications.deliver job for a notification already written (a retry, a postponement,
    a hand-over from a job delivering many); returns its id."""
    from notifications.tasks import notification_deliver  # tasks import services

    return job_defer(
        notification_deliver,
        priority=job_priority(notification.priority, staff=notification.owner.is_staff),
        schedule_at=schedule_at,
        owner_id=notification.owner_id,
        attempts=attempts,
        notification_id=notification.id,
    )


def _postpone(notification: NotificationJob, *, until: datetime, attempt: int) -> None:
    with transaction.atomic():
        job_id = _delivery_job(notification, schedule_at=until)
        NotificationJob.objects.filter(id=notification.id).update(procrastinate_job_id=job_id)
        delivery_log_write(
            notification.id, attempt, DeliveryLog.Outcome.POSTPONED, error="mail server circuit breaker is open"
        )


# The claim, in one statement: a fresh Message-ID is this run's token (only the run holding it
# may mark the row sent), unless the notification has finished or its recipient is muted.
# Durable, although the commit point commits durably after it: the final dot goes out while the
# commit point's COMMIT is in flight (notifications/mail.py), so a crash can lose that COMMIT with
# the e-mail delivered, and the send is then recorded afterwards by this claim's Message-ID
# (tests/notifications/test_commit_point.py fails with this claim not durable).
_CLAIM = """
UPDATE notification_jobs AS n
   SET status = 'processing', provider_message_id = %(message_id)s, started_at = now(), retry_count = %(attempt)s
  FROM notification_recipients AS r
 WHERE n.id = %(id)s
   AND r.id = n.recipient_id
   AND n.status IN ('pending', 'processing', 'failed')
   AND NOT (r.muted_indefinitely OR (r.muted_until IS NOT NULL AND r.muted_until > now()))
RETURNING r.email, n.payload
"""


def notification_deliver(*, notification_id: int, attempt: int) -> str:
    """Send one notification e-mail, at most once (notifications/mail.py). Returns what happened.

    The hot path is four statements: the rate-limit token, the claim, the commit point just
    before the end of DATA, and the delivery log. Raises core.errors.ProviderError when the
    mail server fails (the task decides on retries).
    """
    verdict = breaker_check(name=EMAIL_BREAKER, cooldown_seconds=settings.NOTIFICATIONS_BREAKER_COOLDOWN_SECONDS)
    if not verdict.allowed:
        notification = NotificationJob.objects.filter(id=notification_id).first()
        if notification is None or notification.status in (Status.SENT, Status.CANCELLED):
            return "deleted" if notification is None else notification.status
        _postpone(notification, until=verdict.retry_at, attempt=attempt)
        return "postponed"
    rate_limit_wait(key=EMAIL_RATE_LIMIT, rate=settings.NOTIFICATIONS_RATE_PER_SECOND)

    message_id = make_msgid(domain="secondbrain.localhost")
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM, {"id": notification_id, "message_id": message_id, "attempt": attempt})
        claimed = cursor.fetchone()
    if claimed is None:
        return _not_claimed(notification_id=notification_id, attempt=attempt)
    email, payload = claimed
    if isinstance(payload, str):  # Django's cursor hands jsonb over as text
        payload = json.loads(payload)

    started = time.perf_counter()
    try:
        result = ExactlyOnceEmail(notification_id=notification_id, message_id=message_id, attempt=attempt).send(
            to=email,
            subject=payload.get("subject", ""),
            body=payload.get("body", ""),
            headers={"X-Secondbrain-Notification": str(notification_id)},
        )
    except SendAborted:
        return "superseded"
    except ProviderError as exc:
        mine = NotificationJob.objects.filter(id=notification_id, provider_message_id=message_id)
        # Back from "sent" too when the server refused after the end of data.
        mine.filter(status__in=[Status.PROCESSING, Status.SENT]).update(
            status=Status.PENDING, processed_at=None, error=exc.detail[:2000]
        )
        outcome = DeliveryLog.Outcome.PERMANENT_FAILURE if exc.permanent else DeliveryLog.Outcome.TRANSIENT_FAILURE
        delivery_log_write(notification_id, attempt, outcome, error=exc.detail, started=started)
        if not exc.permanent and not isinstance(exc, CommitPointStalled):  # not the mail server's fault
            breaker_record_failure(
                name=EMAIL_BREAKER,
                threshold=settings.NOTIFICATIONS_BREAKER_THRESHOLD,
                cooldown_seconds=settings.NOTIFICATIONS_BREAKER_COOLDOWN_SECONDS,
            )
        raise
    if not result.logged:
        delivery_log_write(
            notification_id, attempt, DeliveryLog.Outcome.SENT, response=result.response, started=started
        )
    if not verdict.clean:
        breaker_record_success(name=EMAIL_BREAKER)
    return Status.SENT


def _not_claimed(*, notification_id: int, attempt: int) -> str:
    """Why the claim took nothing: deleted, finished already (a re-run), or a muted recipient."""
    notification = NotificationJob.objects.select_related("recipient").filter(id=notification_id).first()
    if notification is None:
        return "deleted"
    if notification.status in (Status.SENT, Status.CANCELLED):
        return notification.status  # a re-run of a finished job does nothing
    recipient = notification.recipient
    if not recipient.is_muted():
        return "already-finished"  # another run changed it between the two statements
    reason = "recipient is muted" + ("" if recipient.muted_indefinitely else f" until {recipient.muted_until}")
    with transaction.atomic():
        NotificationJob.objects.filter(id=notification_id, status__in=[Status.PENDING, Status.FAILED]).update(
            status=Status.CANCELLED, error=reason, processed_at=timezone.now()
        )
        delivery_log_write(notification_id, attempt, DeliveryLog.Outcome.CANCELLED, error=reason)
    return Status.CANCELLED


@transaction.atomic
def notification_hand_over(*, notification_id: int, error: str, attempts: int, retry_at: datetime) -> None:
    """A notification of a job delivering many failed transiently: its next attempt is a job of
    its own at `retry_at`, counting its attempts on from `attempts` (so it gets no more than a
    notification queued alone)."""
    notification_attempt_failed(notification_id=notification_id, error=error, final=False)
    notification = NotificationJob.objects.select_related("owner").filter(id=notification_id).first()
    if notification is None or notification.status != Status.PENDING:
        return  # erased, or cancelled meanwhile
    job_id = _delivery_job(notification, schedule_at=retry_at, attempts=attempts)
    NotificationJob.objects.filter(id=notification.id).update(procrastinate_job_id=job_id)


def notification_attempt_failed(*, notification_id: int, error: str, final: bool) -> None:
    """After a failed attempt: `failed` when no retry follows, else back to `pending`."""
    NotificationJob.objects.filter(id=notification_id, status__in=[Status.PENDING, Status.PROCESSING]).update(
        status=Status.FAILED if final else Status.PENDING,
        error=error[:2000],
        processed_at=timezone.now() if final else None,
    )


# --- Retention (run by the periodic core.purge_expired, see notifications/apps.py) ----------
# Batches in their own short transactions, skipping rows someone holds (as jobs_purge does). The
# FK from the logs is deferred, so a batch deletes its notifications' logs in the same statement.
# `created_at` bounds the scan (indexed; a notification is processed after it was created).
_PURGE_NOTIFICATIONS = """
WITH doomed AS (
    SELECT id FROM notification_jobs
     WHERE created_at < now() - make_interval(days => %(days)s)
       AND status IN ('sent', 'failed', 'cancelled')
       AND (processed_at IS NULL OR processed_at < now() - make_interval(days => %(days)s))
     LIMIT %(batch)s FOR UPDATE SKIP LOCKED
), logs AS (
    DELETE FROM notification_delivery_logs WHERE notification_id IN (SELECT id FROM doomed)
)
DELETE FROM notification_jobs WHERE id IN (SELECT id FROM doomed)
"""
_PURGE_LOGS = """
DELETE FROM notification_delivery_logs WHERE id IN (
    SELECT id FROM notification_delivery_logs WHERE created_at < now() - make_interval(days => %(days)s)
     LIMIT %(batch)s FOR UPDATE SKIP LOCKED
)
"""


def notifications_purge(*, batch_size: int | None = None, max_batches: int = 1000) -> dict[str, int]:
    """Delete finished notification jobs (sent, failed, cancelled) older than
    NOTIFICATIONS_RETENTION_DAYS with their logs, and delivery logs older than
    NOTIFICATIONS_DELIVERY_LOG_RETENTION_DAYS. Waiting and running notifications stay."""
    batch = batch_size or settings.JOBS_RETENTION_BATCH_SIZE
    deleted: dict[str, int] = {}
    with connection.cursor() as cursor:
        for name, statement, days in (
            ("notifications", _PURGE_NOTIFICATIONS, settings.NOTIFICATIONS_RETENTION_DAYS),
            ("delivery_logs", _PURGE_LOGS, settings.NOTIFICATIONS_DELIVERY_LOG_RETENTION_DAYS),
        ):
            total = 0
            for _ in range(max_batches):
                with transaction.atomic():
                    cursor.execute(statement, {"days": days, "batch": batch})
                    total += cursor.rowcount
                if cursor.rowcount < batch:
                    break
            deleted[name] = total
    if any(deleted.values()):
        logger.info("Purged old notifications: %s", deleted)
    return deleted
