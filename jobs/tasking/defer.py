"""Deferring jobs inside the caller's transaction: one job (with owner, deduplication, callback,
locks, parents, batch) or many of one task in one statement."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from procrastinate.jobs import Job
from procrastinate.tasks import Task
from psycopg.types.json import Jsonb

from core.tracing import trace_carrier
from jobs.tasking import workflows
from jobs.tasking.fairness import defers_per_round, first_round_sql
from jobs.tasking.registry import task_options
from jobs.tasking.webhooks import webhook_callback_check

# One statement for the job and, when there is anything to know about it, its info row. It is
# Procrastinate's own insert (procrastinate_defer_jobs_v1) without the function call, and a
# waiting job with the same queueing lock makes it insert nothing (no savepoint needed).
# The owner and the round are for the fair claim (jobs/tasking/fairness.py); the trace context
# for the worker's span (core/tracing.py, migration 0013).
# Every parameter carries its type: parameters are bound by the server (config/settings.py),
# which refuses one used as two types (a varchar column and a text comparison, say).
_QUEUE = "%(queue)s::varchar"
_PRIORITY = "%(priority)s::integer"
_DEFER = f"""
WITH job AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, queueing_lock, args, scheduled_at,
                                    jobs_parents_waiting, jobs_batch_id, owner_id, trace_context, fair_round,
                                    jobs_concurrency_key, jobs_concurrency_limit, attempts)
    VALUES (%(queue)s::varchar, %(task)s::varchar, %(priority)s::integer, %(lock)s::text, %(queueing_lock)s::text,
            %(args)s::jsonb, %(scheduled_at)s::timestamptz, %(parents_waiting)s::integer, %(batch_id)s::bigint,
            %(owner_id)s::bigint, %(trace_context)s::jsonb,
            {first_round_sql(queue=_QUEUE, owner="%(owner_id)s::bigint", priority=_PRIORITY)},
            %(concurrency_key)s::text, %(concurrency_limit)s::integer, %(attempts)s::integer)
    ON CONFLICT (queueing_lock) WHERE status = 'todo' DO NOTHING
    RETURNING id
), info AS (
    INSERT INTO jobs_job_info (job_id, owner_id, dedup_key, dedup_until, callback_url)
    SELECT id, %(owner_id)s::bigint, %(dedup_key)s::varchar,
           CASE WHEN %(dedup_key)s::varchar <> '' THEN now() + make_interval(secs => %(dedup_seconds)s::float8) END,
           %(callback_url)s::varchar
      FROM job
     WHERE %(with_info)s::boolean
)
SELECT id FROM job
"""
# Ids come from the sequence in the order of the SELECT, so numbering the returned ids gives
# each its row of `given` (and so its owner); Procrastinate's batch_defer relies on the same.
# Each owner's jobs take the rounds from their line's next one (one lookup per owner).
_DEFER_MANY = f"""
WITH given AS (
    SELECT args, owner_id, concurrency_key, n, COALESCE(owner_id, 0) AS line,
           row_number() OVER (PARTITION BY owner_id ORDER BY n) - 1 AS turn
      FROM ROWS FROM (jsonb_array_elements(%(args)s::jsonb), unnest(%(owner_ids)s::bigint[]),
                      unnest(%(concurrency_keys)s::text[]))
           WITH ORDINALITY AS g (args, owner_id, concurrency_key, n)
), lines AS MATERIALIZED (  -- once per owner, not once per job
    SELECT line, {first_round_sql(queue=_QUEUE, owner="owners.line", priority=_PRIORITY)} AS rank
      FROM (SELECT DISTINCT line FROM given) AS owners
), jobs AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, queueing_lock, args, scheduled_at,
                                    jobs_parents_waiting, jobs_batch_id, owner_id, trace_context, fair_round,
                                    jobs_concurrency_key, jobs_concurrency_limit)
    SELECT %(queue)s::varchar, %(task)s::varchar, %(priority)s::integer, %(lock)s::text, NULL, given.args,
           %(scheduled_at)s::timestamptz, %(parents_waiting)s::integer, %(batch_id)s::bigint, given.owner_id,
           %(trace_context)s::jsonb, lines.rank + given.turn,
           given.concurrency_key, CASE WHEN given.concurrency_key IS NOT NULL THEN %(concurrency_limit)s::integer END
      FROM given JOIN lines USING (line)
     ORDER BY n
    RETURNING id
), numbered AS (
    SELECT id, row_number() OVER (ORDER BY id) AS n FROM jobs
), info AS (
    INSERT INTO jobs_job_info (job_id, owner_id)
    SELECT numbered.id, given.owner_id FROM numbered JOIN given USING (n) WHERE given.owner_id IS NOT NULL
)
SELECT id FROM numbered ORDER BY n
"""
_DEDUP_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
# The database's clock on both sides, so web processes on other hosts agree.
_DEDUP_EXISTING = "SELECT max(job_id) FROM jobs_job_info WHERE dedup_key = %s AND dedup_until > now()"


def job_defer(
    task: Task,
    *,
    owner_id: int | None = None,
    dedup_key: str | None = None,
    dedup_seconds: float | None = None,
    callback_url: str | None = None,
    queueing_lock: str | None = None,
    lock: str | None = None,
    priority: int | None = None,
    schedule_at: datetime | None = None,
    after: Sequence[int] = (),
    on_parent_failure: str = "cancel",
    batch_id: int | None = None,
    attempts: int = 0,
    **task_kwargs: Any,
) -> int | None:
    """Defer `task` on the current database connection, so inside the caller's transaction.

    A rolled-back transaction leaves no job; a committed one always has it. Without
    deduplication it is one statement (one round trip).

    - `owner_id`: the user the job works for (the jobs API shows it to them).
    - `dedup_key` with `dedup_seconds`: a second defer with the same key inside the window
      returns the first job's id instead of creating a job (whatever that job's state).
    - `callback_url`: POSTed the job's final status and result when it ends (see webhooks.py),
      signed with the owner's secret: it needs `owner_id`.
    - `queueing_lock`: a job already waiting with the same lock makes this a no-op (returns
      None); that waiting job reads the latest rows when it runs.
    - `lock`: jobs sharing it never run at the same time.
    - `after`: ids of jobs this one waits for: it runs once all have succeeded. A parent that
      fails for good or is cancelled cancels it (`on_parent_failure="cancel"`, the default) or
      lets it run anyway (`"run"`); see jobs/tasking/workflows.py.
    - `batch_id`: the open batch the job joins (inside `with job_batch(...)`, that batch).
    - `attempts`: attempts the work has had already, in another job that handed it over (a
      job of many items handing one failed item to a job of its own): the task's retry
      strategy counts on from there, so the item gets no more attempts than it would alone.

    A task declared with `concurrency=` gets its key and limit here (registry.py).
    """
    if dedup_key and not (dedup_seconds and dedup_seconds > 0):
        raise ValueError("dedup_key needs a positive dedup_seconds (the deduplication window)")
    if attempts < 0:
        raise ValueError("attempts counts attempts already made: 0 or more")
    if callback_url:
        webhook_callback_check(callback_url, owner_id=owner_id)
    options = {"queueing_lock": queueing_lock, "lock": lock, "priority": priority, "schedule_at": schedule_at}
    job = task.configure(**{k: v for k, v in options.items() if v is not None}).make_new_job(**task_kwargs)
    concurrency_key, concurrency_limit = task_options(job.task_name).concurrency_slot(task_kwargs, owner_id=owner_id)
    params = {
        **_job_params(job),
        "concurrency_key": concurrency_key,
        "concurrency_limit": concurrency_limit,
        "queueing_lock": job.queueing_lock,
        "owner_id": owner_id,
        "dedup_key": dedup_key or "",
        "dedup_seconds": dedup_seconds or 0,
        "callback_url": callback_url or "",
        "with_info": owner_id is not None or bool(dedup_key) or bool(callback_url),
        "attempts": attempts,
    }
    batch_id = workflows.batch_in_use(batch_id)
    if not dedup_key and not after and batch_id is None:
        return _fetch_id(_DEFER, {**params, "parents_waiting": 0, "batch_id": None})  # the hot path
    with transaction.atomic(), connection.cursor() as cursor:
        if dedup_key:
            # Serialises defers of one key until the transaction ends: no two jobs slip in.
            cursor.execute(_DEDUP_LOCK, [f"jobs-dedup:{dedup_key}"])
            cursor.execute(_DEDUP_EXISTING, [dedup_key])
            existing = cursor.fetchone()[0]
            if existing is not None:
                return existing
        waiting = workflows.parents_lock(after, on_parent_failure)
        job_id = _fetch_id(_DEFER, {**params, "parents_waiting": len(waiting), "batch_id": batch_id})
        if job_id is not None:
            workflows.members_add(batch_id, 1)
            workflows.parents_link([job_id], after, waiting, on_parent_failure)
        return job_id


def job_defer_bulk(
    task: Task,
    kwargs_list: list[dict[str, Any]],
    *,
    owner_id: int | list[int | None] | None = None,
    priority: int | None = None,
    schedule_at: datetime | None = None,
    after: Sequence[int] = (),
    on_parent_failure: str = "cancel",
    batch_id: int | None = None,
) -> list[int]:
    """Defer many jobs of one task in one statement, their owner rows included (`owner_id`: one
    for all, or one per job). Returns their ids in the order of `kwargs_list`. `after` and
    `batch_id` as for `job_defer`, the same for every job (a fan-out after its parents)."""
    if not kwargs_list:
        return []
    owner_ids = owner_id if isinstance(owner_id, list) else [owner_id] * len(kwargs_list)
    if len(owner_ids) != len(kwargs_list):
        raise ValueError("one owner_id per job")
    options = {"priority": priority, "schedule_at": schedule_at}
    job = task.configure(**{k: v for k, v in options.items() if v is not None}).make_new_job()
    options = task_options(job.task_name)
    slots = [
        options.concurrency_slot(kwargs, owner_id=owner) for kwargs, owner in zip(kwargs_list, owner_ids, strict=True)
    ]
    params = {
        **_job_params(job),
        # One JSON array, not an array of jsonb: one C-encoded dump instead of one per job, and
        # no array quoting (a fifth of a bulk defer's time in Python).
        "args": Jsonb(kwargs_list),
        "owner_ids": owner_ids,
        "concurrency_keys": [key for key, _ in slots],
        "concurrency_limit": options.concurrency,
    }
    batch_id = workflows.batch_in_use(batch_id)
    with transaction.atomic(), connection.cursor() as cursor:
        waiting = workflows.parents_lock(after, on_parent_failure)
        cursor.execute(_DEFER_MANY, {**params, "parents_waiting": len(waiting), "batch_id": batch_id})
        ids = [row[0] for row in cursor.fetchall()]
        workflows.members_add(batch_id, len(ids))
        workflows.parents_link(ids, after, waiting, on_parent_failure)
        return ids


def _job_params(job: Job) -> dict[str, Any]:
    return {
        "queue": job.queue,
        "task": job.task_name,
        "priority": job.priority,
        "lock": job.lock,
        "args": Jsonb(job.task_kwargs),
        "scheduled_at": job.scheduled_at,
        "defers_per_round": defers_per_round(),
        # The deferring span's context (core/tracing.py), NULL when tracing is off.
        "trace_context": Jsonb(carrier) if (carrier := trace_carrier()) is not None else None,
    }


def _fetch_id(query: str, params: dict[str, Any]) -> int | None:
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        row = cursor.fetchone()
    return row[0] if row else None
