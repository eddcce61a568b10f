"""Jobs that belong to rows: cancelled with their row, erased with their owner.

- `job_cancel_waiting(lock=...)`: in the caller's transaction (the one that deletes the row the
  jobs work on), the waiting jobs of that `lock` end `cancelled`; a running one finishes, and
  finds its row gone.
- `jobs_erase_owner(owner_id)`: every job of the user (waiting, running or finished) is deleted
  with its arguments, events, progress, result and info row, and so are the completion webhooks
  queued for them. A running job's worker finishes it; its end is dropped (the row is gone) and
  what it writes to deleted rows changes nothing. The concurrency slots of keys with nothing
  running go too (a key may name the user). Registered as an eraser (core/erasure.py).
"""

from __future__ import annotations

from django.db import connection

# The status change fires the statement-level trigger (events, streams, webhooks) as any cancel.
_CANCEL_WAITING = """
UPDATE procrastinate_jobs SET status = 'cancelled' WHERE lock = %(lock)s AND status = 'todo'
"""
# procrastinate_events go by a statement trigger (migration 0019), jobs_job_info by its foreign key (migration 0002).
_ERASE_OWNER = """
WITH theirs AS (SELECT job_id AS id FROM jobs_job_info WHERE owner_id = %(owner_id)s),
webhooks AS (
    SELECT jobs.id FROM procrastinate_jobs AS jobs
     WHERE jobs.queue_name = 'webhooks' AND jobs.task_name = 'jobs.webhook_deliver'
       AND (jobs.args ->> 'job_id')::bigint IN (SELECT id FROM theirs)
)
DELETE FROM procrastinate_jobs WHERE id IN (SELECT id FROM theirs UNION ALL SELECT id FROM webhooks)
"""


def job_cancel_waiting(*, lock: str) -> int:
    """Cancel the jobs of `lock` that wait (`todo`); returns how many."""
    with connection.cursor() as cursor:
        cursor.execute(_CANCEL_WAITING, {"lock": lock})
        return cursor.rowcount


# A concurrency key may name the user (llm:user:<id>) and outlive their jobs in its slot row: the
# rows of every key with nothing running go (a claim creates a key's row again when it needs it;
# one that a claim holds now waits for it, then is kept if that claim took a slot).
_ERASE_IDLE_SLOTS = "DELETE FROM jobs_concurrency_slots WHERE running <= 0"


def jobs_erase_owner(owner_id: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(_ERASE_OWNER, {"owner_id": owner_id})
        cursor.execute(_ERASE_IDLE_SLOTS)  # after the DELETE's trigger freed the user's slots
