"""The operator's writes to the job system: cancelling and retrying, pausing queues, retention,
webhook delivery and secrets, stalled jobs. Deferring is the task author's: jobs/tasking/defer.py."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import psycopg
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone
from procrastinate.contrib.django import app
from procrastinate.exceptions import ConnectorException
from procrastinate.manager import JobManager

from core.errors import ApplicationError, ProviderError
from jobs.engine.connector import is_connection_error
from jobs.models import JobInfo, PausedQueue, WebhookSecret
from jobs.tasking import queues
from jobs.tasking.webhooks import webhook_post

logger = logging.getLogger(__name__)


async def jobs_retry_stalled(*, job_manager: JobManager, seconds_since_heartbeat: float) -> dict[str, list]:
    """Put back to `todo` the jobs held by workers that stopped heartbeating (e.g. SIGKILL).

    Each job on its own: one that cannot be retried is reported and skipped, and the rest of
    the list never waits for the next run because of it. A job whose queueing lock has a newer
    job waiting is superseded by it (migration 0005). Returns the ids `retried`, the
    `superseded` ones (with the job that does their work) and the `skipped` ones (with why)."""
    stalled = await job_manager.get_stalled_jobs(seconds_since_heartbeat=seconds_since_heartbeat)
    report: dict[str, list] = {"retried": [], "superseded": [], "skipped": [], "concurrency_fixed": []}
    for job in stalled:
        assert job.id is not None
        try:
            waiting_id = await job_manager.retry_job(job)
        except ConnectorException as exc:
            if isinstance(exc.__cause__, psycopg.errors.RaiseException):
                continue  # it ended (or was rescued) since the list was read: nothing to do
            if is_connection_error(exc):
                raise  # the next run retries them all
            logger.exception("Could not retry stalled job %s; skipped", job.id)
            report["skipped"].append({"job_id": job.id, "reason": _reason(exc)})
            continue
        if waiting_id is None:
            report["retried"].append(job.id)
        else:
            report["superseded"].append({"job_id": job.id, "by_job_id": waiting_id})
    # After the retries: the slots they freed are counted by the triggers already; this only
    # corrects a drift (and drops the slot rows of keys with nothing running).
    rows = await job_manager.connector.execute_query_all_async(query=_RECONCILE)
    report["concurrency_fixed"] = _reconciled(rows)
    if report["retried"]:
        logger.warning("Retried %d stalled job(s): %s", len(report["retried"]), report["retried"])
    if report["superseded"] or report["skipped"]:
        logger.warning(
            "Stalled jobs not retried: %d superseded by a waiting job of their queueing lock %s, %d skipped %s",
            len(report["superseded"]),
            report["superseded"],
            len(report["skipped"]),
            report["skipped"],
        )
    return report


# Concurrency limits (migration 0012): each key's running count, recomputed from its `doing` jobs.
_RECONCILE = "SELECT key, counted, actual FROM jobs_concurrency_reconcile()"


def jobs_concurrency_reconcile() -> list[dict[str, Any]]:
    """Recompute every concurrency key's running count from the jobs `doing` now; returns the
    keys whose count was wrong (`counted`, `actual`), logged. The triggers keep the counts on
    every path out of `doing`; a drift needs a TRUNCATE or triggers disabled. The stalled-job
    rescue runs it too."""
    with connection.cursor() as cursor:
        cursor.execute(_RECONCILE)
        rows = [{"key": key, "counted": counted, "actual": actual} for key, counted, actual in cursor.fetchall()]
    return _reconciled(rows)


def _reconciled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fixed = [{"key": row["key"], "counted": row["counted"], "actual": row["actual"]} for row in rows]
    if fixed:
        logger.warning("Corrected the running count of %d concurrency key(s): %s", len(fixed), fixed)
    return fixed


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


# --- Operating jobs and queues --------------------------------------------------------------


_REQUEUE = "UPDATE procrastinate_jobs SET status = 'todo', attempts = 0, scheduled_at = NULL, abort_requested = false"

# An operator's retry never supersedes anything: a job already waiting with the same queueing
# lock does the same work, so retrying this one is refused (409) or, in bulk, skipped. Of two
# failed jobs of one queueing lock, a bulk retry takes the newest.
_REQUEUE_FAILED_OF_TASK = f"""
WITH failed AS (
    SELECT id, queueing_lock FROM procrastinate_jobs WHERE task_name = %(task)s AND status = 'failed'
), chosen AS (
    SELECT DISTINCT ON (queueing_lock, CASE WHEN queueing_lock IS NULL THEN id END) id
      FROM failed
     WHERE queueing_lock IS NULL
        OR NOT EXISTS (
               SELECT 1 FROM procrastinate_jobs AS waiting
                WHERE waiting.queueing_lock = failed.queueing_lock AND waiting.status = 'todo'
           )
     ORDER BY queueing_lock, CASE WHEN queueing_lock IS NULL THEN id END, id DESC
)
{_REQUEUE} WHERE id IN (SELECT id FROM chosen) AND status = 'failed'
"""
_FAILED_OF_TASK_LEFT = """
SELECT failed.id, waiting.id, failed.queueing_lock
  FROM procrastinate_jobs AS failed
  LEFT JOIN procrastinate_jobs AS waiting
    ON waiting.queueing_lock = failed.queueing_lock AND waiting.status = 'todo'
 WHERE failed.task_name = %(task)s AND failed.status = 'failed'
 ORDER BY failed.id
 LIMIT %(limit)s
"""
_WAITING_OF_LOCK = """
SELECT waiting.id, job.queueing_lock
  FROM procrastinate_jobs AS job
  JOIN procrastinate_jobs AS waiting
    ON waiting.queueing_lock = job.queueing_lock AND waiting.status = 'todo' AND waiting.id <> job.id
 WHERE job.id = %s
"""
SKIPPED_LISTED = 100  # a bulk retry lists this many skipped jobs with their reason, counts all


def job_cancel(*, job_id: int) -> None:
    """Cancel a job that has not started. Raises ApplicationError 409 otherwise."""
    if not app.job_manager.cancel_job_by_id(job_id, abort=False):
        raise ApplicationError("Only a job that has not started can be cancelled.", status_code=409)


def job_retry(*, job_id: int) -> None:
    """Put a failed (or aborted) job back in its queue with fresh attempts, to run at once.

    Raises ApplicationError 409 when the job is not failed or aborted, or when a job with the
    same queueing lock already waits (it does the same work)."""
    retried = _requeue_unless_lock_taken(job_id, _REQUEUE + " WHERE id = %s AND status IN ('failed', 'aborted')")
    if not retried:
        raise ApplicationError("Only a failed or aborted job can be retried.", status_code=409)


def job_retry_stuck(*, job_id: int) -> None:
    """The admin's Retry: a failed job, or one stuck `doing`, back to `todo` now (Procrastinate's
    `procrastinate_retry_job_v2`, which spends an attempt). 409 as for `job_retry`."""
    try:
        _requeue_unless_lock_taken(job_id, "SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)")
    except DatabaseError as exc:
        if not isinstance(exc.__cause__, psycopg.errors.RaiseException):
            raise
        raise ApplicationError("Only a failed or running job can be retried.", status_code=409) from exc


def _requeue_unless_lock_taken(job_id: int, statement: str) -> bool:
    """Run `statement` (job_id its one parameter); True when it changed the job. The unique index
    of queueing locks refuses it when a job with the same lock waits: ApplicationError 409."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement, [job_id])
            return cursor.rowcount == 1
    except IntegrityError as exc:
        if not _is_queueing_lock_conflict(exc):
            raise
        with connection.cursor() as cursor:
            cursor.execute(_WAITING_OF_LOCK, [job_id])
            row = cursor.fetchone()
        waiting_id, lock = row if row else (None, None)
        raise ApplicationError(
            _lock_taken(waiting_id, lock), status_code=409, extra={"waiting_job_id": waiting_id}
        ) from exc


def _is_queueing_lock_conflict(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, psycopg.errors.UniqueViolation) and (cause.diag.constraint_name or "").startswith(
        "procrastinate_jobs_queueing_lock_idx"
    )


def _lock_taken(waiting_id: int | None, lock: str | None) -> str:
    if waiting_id is None:  # it started between the conflict and the look-up
        return "A job with the same queueing lock was waiting; try again."
    return (
        f"Job {waiting_id} is already waiting with the same queueing lock ({lock}) and does this work;"
        " retry this job once that one has started."
    )


def job_retry_failed(*, task_name: str) -> dict[str, Any]:
    """Re-queue every failed job of a task (the dashboard's action), each on its own: a job
    whose queueing lock has a job waiting is skipped and reported. Returns `retried` (how many),
    `skipped` (how many) and `skipped_jobs` (the first SKIPPED_LISTED, each with its reason)."""
    params = {"task": task_name, "limit": SKIPPED_LISTED}
    for attempt in range(3):
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(_REQUEUE_FAILED_OF_TASK, params)
                retried = cursor.rowcount
            break
        except IntegrityError as exc:
            # A job of one of those locks was deferred while this ran: once it has committed,
            # the next round sees it waiting and skips its lock.
            if not _is_queueing_lock_conflict(exc) or attempt == 2:
                raise
    with connection.cursor() as cursor:
        cursor.execute(_FAILED_OF_TASK_LEFT, params)
        left = cursor.fetchall()
        if len(left) == SKIPPED_LISTED:
            cursor.execute(
                "SELECT count(*) FROM procrastinate_jobs WHERE task_name = %s AND status = 'failed'", [task_name]
            )
            skipped = cursor.fetchone()[0]
        else:
            skipped = len(left)
    skipped_jobs = [
        {"job_id": job_id, "waiting_job_id": waiting_id, "reason": _lock_taken(waiting_id, lock)}
        for job_id, waiting_id, lock in left
    ]
    if skipped:
        logger.warning("Retry of the failed %s jobs skipped %d: %s", task_name, skipped, skipped_jobs)
    return {"retried": retried, "skipped": skipped, "skipped_jobs": skipped_jobs}


def queue_pause(*, queue: str, by: AbstractBaseUser | None = None) -> PausedQueue:
    """Workers stop taking this queue's jobs at their next fetch; running jobs finish."""
    _queue_check(queue)
    paused, _ = PausedQueue.objects.get_or_create(queue_name=queue, defaults={"paused_by": by})
    return paused


def queue_resume(*, queue: str) -> None:
    """Workers take the queue's jobs again; idle ones are woken at once."""
    _queue_check(queue)
    with transaction.atomic():
        PausedQueue.objects.filter(queue_name=queue).delete()
        with connection.cursor() as cursor:
            wake = json.dumps({"type": "job_inserted"})
            cursor.execute(
                "SELECT pg_notify('procrastinate_any_queue_v1', %s), pg_notify(%s, %s)",
                [wake, f"procrastinate_queue_v1#{queue}", wake],
            )


def _queue_check(queue: str) -> None:
    if queue not in queues.ALL:
        raise ApplicationError("Unknown queue.", extra={"queue": [f"Must be one of: {', '.join(queues.ALL)}."]})


# Finished jobs whose last event is older than their queue's retention, oldest first, skipping
# rows another purge holds. Deleting a job deletes its events (a statement trigger, migration
# 0019) and its info row (ON DELETE CASCADE).
# The candidates come from the finishing events by time (migration 0015's index), from the oldest
# up to the class's shortest retention: the walk ends there, never reading waiting jobs.
_PURGE = """
WITH policy (queue_name, keep_seconds) AS (
    SELECT * FROM unnest(%(queues)s::varchar[], %(seconds)s::int[])
), doomed AS (
    SELECT job.id
      FROM procrastinate_events AS ended
      -- One primary-key lookup per finishing event: as a plain join, the planner's estimate of
      -- the events in range made it hash-join a sequential scan of every job (the backlog again).
      CROSS JOIN LATERAL (SELECT * FROM procrastinate_jobs AS job
                           WHERE job.id = ended.job_id
                             AND job.status = ANY(%(statuses)s::procrastinate_job_status[])
                          OFFSET 0) AS job
      LEFT JOIN policy ON policy.queue_name = job.queue_name
     WHERE ended.type IN ('succeeded', 'failed', 'cancelled', 'aborted')
       AND ended.at < now() - make_interval(secs => %(shortest_seconds)s)
       AND (SELECT max(event.at) FROM procrastinate_events AS event WHERE event.job_id = job.id)
           < now() - make_interval(secs => COALESCE(policy.keep_seconds, %(default_seconds)s))
     ORDER BY ended.at, ended.job_id
     LIMIT %(batch)s
       FOR UPDATE OF job SKIP LOCKED
)
DELETE FROM procrastinate_jobs WHERE id IN (SELECT id FROM doomed)
"""

RETENTION_CLASSES = {
    # statuses -> (default seconds setting, per-queue setting)
    ("succeeded", "cancelled"): ("JOBS_SUCCEEDED_RETENTION_SECONDS", "JOBS_SUCCEEDED_RETENTION_BY_QUEUE"),
    ("failed", "aborted"): ("JOBS_FAILED_RETENTION_SECONDS", "JOBS_FAILED_RETENTION_BY_QUEUE"),
}


def jobs_purge(*, batch_size: int | None = None, max_batches: int = 1000) -> dict[str, int]:
    """Delete finished jobs past their retention, in small autocommitted batches, so the purge
    never holds many row locks or a long transaction on the queue. Also drops expired results."""
    batch = batch_size or settings.JOBS_RETENTION_BATCH_SIZE
    deleted: dict[str, int] = {}
    with connection.cursor() as cursor:
        for statuses, (default_setting, by_queue_setting) in RETENTION_CLASSES.items():
            by_queue = getattr(settings, by_queue_setting)
            params = {
                "statuses": list(statuses),
                "queues": list(by_queue),
                "seconds": list(by_queue.values()),
                "default_seconds": getattr(settings, default_setting),
                "shortest_seconds": min([getattr(settings, default_setting), *by_queue.values()]),
                "batch": batch,
            }
            total = 0
            for _ in range(max_batches):
                with transaction.atomic():
                    cursor.execute(_PURGE, params)
                    total += cursor.rowcount
                if cursor.rowcount < batch:
                    break
            deleted["/".join(statuses)] = total
        cursor.execute(
            "UPDATE jobs_job_info SET result = NULL, result_expires_at = NULL WHERE result_expires_at < now()"
        )
        deleted["expired_results"] = cursor.rowcount
    if any(deleted.values()):
        logger.info("Purged finished jobs: %s", deleted)
    return deleted


def webhook_deliver(*, job_id: int, status: str, delivery_id: int) -> int:
    """POST a finished job's status and result to its callback URL, signed with its owner's
    secret as it is now (a delivery queued before a rotation is signed with the new secret).
    Returns the HTTP status."""
    info = JobInfo.objects.select_related("job").filter(job_id=job_id).first()
    if info is None or not info.callback_url:
        return 0  # the job is gone (retention) or has no callback
    if info.owner_id is None:
        # Only jobs deferred before secrets were per user: nobody's key may sign for them.
        raise ProviderError("the job has no owner whose secret could sign its callback", permanent=True)
    job = info.job
    expired = info.result_expires_at is not None and info.result_expires_at < timezone.now()
    payload = {
        "delivery_id": delivery_id,
        "job_id": job_id,
        "task": job.task_name,
        "queue": job.queue_name,
        "status": status,
        "attempts": job.attempts,
        "result": None if expired else info.result,
        "error": info.error or None,
    }
    secret = webhook_secret_get(user_id=info.owner_id).secret
    return webhook_post(url=info.callback_url, payload=payload, secret=secret, delivery_id=delivery_id)


def _new_webhook_secret() -> str:
    return "whsec_" + secrets.token_hex(32)


def webhook_secret_get(*, user_id: int) -> WebhookSecret:
    """The user's webhook signing secret, made on first use (concurrent first uses get one)."""
    secret, _ = WebhookSecret.objects.get_or_create(
        user_id=user_id, defaults={"secret": _new_webhook_secret(), "created_at": timezone.now()}
    )
    return secret


@transaction.atomic
def webhook_secret_rotate(*, user_id: int) -> WebhookSecret:
    """Replace the user's signing secret. Every delivery sent from now on is signed with the new
    one, including retries of deliveries queued before; the old one stops working at once."""
    secret, _ = WebhookSecret.objects.update_or_create(
        user_id=user_id, defaults={"secret": _new_webhook_secret(), "created_at": timezone.now()}
    )
    return secret


# --- Batches as a whole -----------------------------------------------------------------------

# Running members finish; the trigger counts the cancelled ones (the batch may complete now).
_BATCH_CANCEL = """
WITH cancelled AS (
    UPDATE procrastinate_jobs SET status = 'cancelled'
     WHERE jobs_batch_id = %(batch_id)s AND status = 'todo'
    RETURNING id
), reasons AS (
    INSERT INTO jobs_job_info (job_id, error)
    SELECT id, 'Cancelled with its batch ' || %(batch_id)s FROM cancelled
    ON CONFLICT (job_id) DO UPDATE SET error = EXCLUDED.error
)
SELECT count(*) FROM cancelled
"""


def job_batch_cancel(*, batch_id: int) -> int:
    """Cancel the batch's members that have not started; returns how many. Running members
    finish. The callbacks run as usual once every member has ended (with the cancelled counted)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_BATCH_CANCEL, {"batch_id": batch_id})
        return cursor.fetchone()[0]


def job_batch_retry_failed(*, batch_id: int) -> dict[str, list[int]]:
    """Retry the batch's failed (and aborted) members, each as `job_retry` would. A completed
    batch reopens, and completes again (its callbacks once more) when they have ended.
    Returns {"retried": [...], "refused": [...]} (refused: a job of its queueing lock waits)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id FROM procrastinate_jobs WHERE jobs_batch_id = %s AND status IN ('failed', 'aborted')"
            " ORDER BY id",
            [batch_id],
        )
        failed = [row[0] for row in cursor.fetchall()]
    outcome: dict[str, list[int]] = {"retried": [], "refused": []}
    for job_id in failed:
        try:
            job_retry(job_id=job_id)
        except ApplicationError:
            outcome["refused"].append(job_id)
        else:
            outcome["retried"].append(job_id)
    return outcome
