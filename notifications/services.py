from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import make_msgid

import psycopg
import psycopg.generators
import psycopg.waiting
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.utils import timezone
from procrastinate.contrib.django import app
from rest_framework import status as http

from core.errors import ApplicationError, ProviderError
from core.quotas import quota_take
from jobs.breaker import breaker_check, breaker_record_failure, breaker_record_success
from jobs.ratelimit import rate_limit_wait
from jobs.services import job_defer, job_defer_bulk
from notifications.mail import EmailSender, SendAborted, dot_sent
from notifications.models import (
    JOB_PRIORITY,
    DeliveryLog,
    DeliveryMethod,
    NotificationJob,
    Recipient,
    Status,
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


def email_quota_fits(*, owner_id: int, count: int) -> bool:
    """email_quota_take for callers that skip instead of answering 429 (the digest sweep)."""
    try:
        with transaction.atomic():
            email_quota_take(owner_id=owner_id, count=count)
    except ApplicationError:
        return False
    return True


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
        priority=JOB_PRIORITY[priority],
        schedule_at=scheduled_for,
        owner_id=owner.pk,
        callback_url=callback_url,
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
    )


@dataclass(frozen=True)
class QueuedEmail:
    owner_id: int
    recipient_id: int
    subject: str
    body: str


def notifications_queue(
    emails: list[QueuedEmail], *, notification_type: str, priority: str, scheduled_for: datetime | None = None
) -> list[int]:
    """Queue many e-mails, each its own notification and job, in three statements whatever their
    number. Call inside the caller's transaction (the rows and their jobs commit together), after
    counting them against their owners' quotas (email_quota_take)."""
    from notifications.tasks import notification_deliver  # tasks import services

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
    job_ids = job_defer_bulk(
        notification_deliver,
        [{"notification_id": i} for i in ids],
        owner_id=[email.owner_id for email in emails],
        priority=JOB_PRIORITY[priority],
        schedule_at=scheduled_for,
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE notification_jobs n SET procrastinate_job_id = v.job_id"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, job_id) WHERE n.id = v.id",
            [ids, job_ids],
        )
    return ids


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
    if job_id is not None and not app.job_manager.cancel_job_by_id(job_id):
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


@transaction.atomic
def notification_retry(*, notification: NotificationJob) -> NotificationJob:
    """Re-queue a failed notification with a fresh job (and a fresh set of attempts)."""
    from notifications.tasks import notification_deliver  # tasks import services

    notification = NotificationJob.objects.select_for_update().get(id=notification.id)
    if notification.status != Status.FAILED:
        raise ApplicationError(
            f"Only failed notifications can be retried; this one is {notification.status}.",
            status_code=http.HTTP_409_CONFLICT,
        )
    email_quota_take(owner_id=notification.owner_id)  # a retry sends again
    notification.status = Status.PENDING
    notification.error = ""
    notification.procrastinate_job_id = job_defer(
        notification_deliver,
        priority=JOB_PRIORITY[notification.priority],
        owner_id=notification.owner_id,
        notification_id=notification.id,
    )
    notification.save(update_fields=["status", "error", "procrastinate_job_id"])
    return notification


# --- Delivery (called by the task) ----------------------------------------------------------
_LOG = """
INSERT INTO notification_delivery_logs
       (notification_id, attempt, outcome, error, provider_response, duration_ms, created_at)
VALUES (%s, %s, %s, %s, %s, %s, now())
"""


def _log(notification_id: int, attempt: int, outcome: str, *, error: str = "", response: str = "", started=None):
    duration = (time.perf_counter() - started) * 1000 if started else 0
    with connection.cursor() as cursor:
        cursor.execute(_LOG, [notification_id, attempt, outcome, error[:2000], response[:2000], duration])


def _postpone(notification: NotificationJob, *, until: datetime, attempt: int) -> None:
    from notifications.tasks import notification_deliver  # tasks import services

    with transaction.atomic():
        job_id = job_defer(
            notification_deliver,
            priority=JOB_PRIORITY[notification.priority],
            schedule_at=until,
            owner_id=notification.owner_id,
            notification_id=notification.id,
        )
        NotificationJob.objects.filter(id=notification.id).update(procrastinate_job_id=job_id)
        _log(notification.id, attempt, DeliveryLog.Outcome.POSTPONED, error="mail server circuit breaker is open")


# The claim, in one statement: a fresh Message-ID is this run's token (only the run holding it
# may mark the row sent), unless the notification has finished or its recipient is muted.
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
# The commit point commits durably whatever the role's or the database's default: a COMMIT
# acknowledged but not yet flushed (synchronous_commit = off) is lost in a crash, and its re-run
# would send the e-mail a second time.
_DURABLE = "SET LOCAL synchronous_commit = on"
_MARK_SENT = """
UPDATE notification_jobs SET status = 'sent', processed_at = now(), error = ''
 WHERE id = %s AND provider_message_id = %s AND status = 'processing'
"""


def notification_deliver(*, notification_id: int, attempt: int) -> str:
    """Send one notification e-mail, at most once. Returns what happened.

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

    def commit_point() -> Callable[[], None]:
        return _mark_sent_with_the_dot(notification_id=notification_id, message_id=message_id)

    started = time.perf_counter()
    try:
        result = EmailSender().send(
            to=email,
            subject=payload.get("subject", ""),
            body=payload.get("body", ""),
            message_id=message_id,
            headers={"X-Secondbrain-Notification": str(notification_id)},
            commit_point=commit_point,
        )
    except SendAborted:
        return "superseded"
    except (psycopg.Error, DatabaseError):
        if not dot_sent():
            raise
        # The dot went out but the COMMIT's answer never came (the database went away, or lost
        # the COMMIT in a crash or a failover): the e-mail is sent. Record it once the database
        # answers, however long that takes; the job never raises here, so it never runs again.
        _record_sent_when_back(notification_id=notification_id, message_id=message_id, attempt=attempt)
        return Status.SENT
    except ProviderError as exc:
        mine = NotificationJob.objects.filter(id=notification_id, provider_message_id=message_id)
        # Back from "sent" too when the server refused after the end of data.
        mine.filter(status__in=[Status.PROCESSING, Status.SENT]).update(
            status=Status.PENDING, processed_at=None, error=exc.detail[:2000]
        )
        outcome = DeliveryLog.Outcome.PERMANENT_FAILURE if exc.permanent else DeliveryLog.Outcome.TRANSIENT_FAILURE
        _log(notification_id, attempt, outcome, error=exc.detail, started=started)
        if not exc.permanent and not isinstance(exc, CommitPointStalled):  # not the mail server's fault
            breaker_record_failure(
                name=EMAIL_BREAKER,
                threshold=settings.NOTIFICATIONS_BREAKER_THRESHOLD,
                cooldown_seconds=settings.NOTIFICATIONS_BREAKER_COOLDOWN_SECONDS,
            )
        raise
    _log(notification_id, attempt, DeliveryLog.Outcome.SENT, response=result.response, started=started)
    if not verdict.clean:
        breaker_record_success(name=EMAIL_BREAKER)
    return Status.SENT


class CommitPointStalled(ProviderError):
    """The commit point stalled (its process was stopped, its host froze) for so long that the
    server may have ended its session: its COMMIT would be lost, so no dot follows."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the commit point stalled for {seconds:.1f} s; not sending the final dot", permanent=False)


def _check_session_alive(*, started: float) -> None:
    """Call after the commit point's UPDATE, before its COMMIT. A session idle in its transaction
    for DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS is ended by the server, which frees the row
    for a rescue; a COMMIT written into it afterwards is lost while the dot still reaches the mail
    server. So a commit point that took half that long, or whose server has hung up, stops here."""
    elapsed = time.monotonic() - started
    limit = settings.DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS / 2
    if limit and elapsed > limit:
        raise CommitPointStalled(elapsed)
    pgconn = connection.connection.pgconn
    pgconn.consume_input()  # raises when the server has closed the session
    if pgconn.status != psycopg.pq.ConnStatus.OK:
        raise CommitPointStalled(elapsed)


def _mark_sent_with_the_dot(*, notification_id: int, message_id: str) -> Callable[[], None]:
    """The commit point, called just before the final "." of DATA: mark the row `sent` in a
    transaction, send its COMMIT without waiting, and return what reads the COMMIT's answer once
    the dot is out.

    A worker killed before this COMMIT leaves (even after the UPDATE reached the database) rolls
    the row back and writes no dot, so the server discards the message and a re-run sends it
    once. Killed after, the database commits what it has received and the dot follows in the
    same instant. What remains is the few microseconds between the two writes, where a kill
    loses the e-mail rather than sending it twice.
    """
    started = time.monotonic()
    connection.set_autocommit(False)
    try:
        with connection.cursor() as cursor:
            cursor.execute(_DURABLE)
            cursor.execute(_MARK_SENT, [notification_id, message_id])
            if cursor.rowcount != 1:
                raise SendAborted
        _check_session_alive(started=started)
    except BaseException:
        try:
            connection.rollback()
            connection.set_autocommit(True)
        except DatabaseError:
            connection.close()  # the session is gone: the next statement opens a fresh one
        raise
    pgconn = connection.connection.pgconn
    pgconn.send_query(b"COMMIT")
    while pgconn.flush():
        pass

    def read_commit() -> None:
        try:
            results = psycopg.waiting.wait(psycopg.generators.fetch_many(pgconn), pgconn.socket)
            failed = [r for r in results if r.status != psycopg.pq.ExecStatus.COMMAND_OK]
            if failed:
                raise psycopg.OperationalError(f"COMMIT failed: {failed[0].error_message.decode(errors='replace')}")
        finally:
            connection.set_autocommit(True)

    return read_commit


_RECORD_SENT = """
UPDATE notification_jobs SET status = 'sent', processed_at = coalesce(processed_at, now()), error = ''
 WHERE id = %s AND provider_message_id = %s AND status IN ('processing', 'sent')
"""
_RECORD_RETRY_SECONDS = 0.2


def _record_sent_when_back(*, notification_id: int, message_id: str, attempt: int) -> None:
    """Record a send whose dot left while the COMMIT's answer was lost. The job waits
    NOTIFICATIONS_OUTCOME_WAIT_SECONDS for the database; then the process's recorder thread
    takes over and keeps trying until the database answers. Nothing raises, so nothing runs
    the job again and sends a second e-mail meanwhile."""
    deadline = time.monotonic() + settings.NOTIFICATIONS_OUTCOME_WAIT_SECONDS
    while not _record_sent(notification_id=notification_id, message_id=message_id, attempt=attempt):
        if time.monotonic() > deadline:
            _recorder.add(notification_id=notification_id, message_id=message_id, attempt=attempt)
            return
        time.sleep(_RECORD_RETRY_SECONDS)


def _record_sent(*, notification_id: int, message_id: str, attempt: int) -> bool:
    """One attempt; True once the database has the outcome (False: it is still away)."""
    connection.close()  # a session that lost its server, or that was left mid-transaction
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(_DURABLE)
                cursor.execute(_RECORD_SENT, [notification_id, message_id])
                recorded = cursor.rowcount == 1
            if recorded:
                response = "sent; recorded after a database outage"
            else:
                # Another run claimed it meanwhile (it was rescued): it may have gone twice.
                response = "sent; recorded after a database outage, but another run had claimed it since"
                logger.error("Notification %s: %s (Message-ID %s)", notification_id, response, message_id)
            if NotificationJob.objects.filter(id=notification_id).exists():
                _log(notification_id, attempt, DeliveryLog.Outcome.SENT, response=response)
    except (OperationalError, InterfaceError):  # the database is still away
        connection.close()
        return False
    except DatabaseError:
        # Not an outage (a bug, a schema change): retrying would never end.
        logger.exception("Notification %s: sent, but the send could not be recorded", notification_id)
    return True


class _OutcomeRecorder:
    """Sends whose outcome a job could not record in time, recorded by one thread of the process
    as soon as the database answers. Not a daemon: a stopping worker waits for it, so what only
    this process knows (the dot left) is not lost with it."""

    LOG_EVERY_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._thread: threading.Thread | None = None

    def add(self, **send: int | str) -> None:
        with self._lock:
            self._pending.append(send)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="notification-outcomes")
                self._thread.start()
        logger.warning("Notification %s: sent, recorded once the database answers", send["notification_id"])

    def _run(self) -> None:
        logged_at = time.monotonic()
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    connection.close()  # this thread's own
                    return
                send = self._pending[0]
            if _record_sent(**send):
                with self._lock:
                    self._pending.remove(send)
                continue
            if time.monotonic() - logged_at > self.LOG_EVERY_SECONDS:
                logged_at = time.monotonic()
                ids = [pending["notification_id"] for pending in self._pending]
                logger.warning("Waiting for the database to record %d sent notification(s): %s", len(ids), ids)
            time.sleep(_RECORD_RETRY_SECONDS)


_recorder = _OutcomeRecorder()


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
        _log(notification_id, attempt, DeliveryLog.Outcome.CANCELLED, error=reason)
    return Status.CANCELLED


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
