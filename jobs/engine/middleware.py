"""The worker middleware: what the job layer does around every job a worker runs.

1. Rate limits (`RateLimit` in `job_task`): take a token from each bucket in PostgreSQL. A job
   whose token is close waits in place; otherwise it is postponed to when its token is due,
   without spending an attempt.
2. Time limit: past it the job fails with `TimeLimitExceeded` and follows its retry policy; on
   the last attempt a task's `on_time_limit` runs instead, when it has one.
3. Abort: a sync task cannot be cancelled, so the middleware watches for an abort request
   (an operator's, or the worker's own shutdown after its grace period) and gives up waiting.
4. A failure stores its error message in `jobs_job_info`, next to progress. (The returned
   value, the job's result, is written there with the job's end: jobs/engine/manager.py.)
5. Neither a postponed job (a rate limit, or a snooze: `JobSnooze`, counted against the task's
   `max_snoozes`) nor one aborted by its worker's shutdown spends an attempt, and a
   worker that re-queues a job for later wakes itself when it is due (Procrastinate sends no
   NOTIFY for a retried job, so it would otherwise wait for its next poll).
6. Tracing (core/tracing.py), when it is on: each attempt is a span in the trace of whoever
   deferred the job, with its queue, task, attempt and wait time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection as db_connection
from django.utils import timezone
from procrastinate import JobContext
from procrastinate.exceptions import JobAborted
from procrastinate.job_context import AbortReason

from core.redaction import redact
from core.tracing import job_span, span_failed, tracer
from jobs.tasking.limits import TimeLimitExceeded
from jobs.tasking.ratelimit import rate_limit_refund, rate_limit_try_acquire
from jobs.tasking.registry import TaskOptions, task_options
from jobs.tasking.retry import Postponed
from jobs.tasking.snooze import JobSnooze, SnoozeLimitExceeded

logger = logging.getLogger(__name__)

ABORT_POLL_SECONDS = 0.2

_STORE_ERROR = """
INSERT INTO jobs_job_info (job_id, error) VALUES (%(job_id)s, %(error)s)
ON CONFLICT (job_id) DO UPDATE SET error = EXCLUDED.error
"""
# A retried job that now succeeds without a result: its last error is no longer true.
_CLEAR_ERROR = "UPDATE jobs_job_info SET error = '' WHERE job_id = %(job_id)s AND error <> ''"
# The retry that follows a postponement or a shutdown adds one attempt back: the two cancel out.
_UNCOUNT_ATTEMPT = "UPDATE procrastinate_jobs SET attempts = attempts - 1 WHERE id = %(job_id)s"
# A job's snoozes, counted with the snooze they record (periodic jobs have no row yet: one is made).
_COUNT_SNOOZE = """
INSERT INTO jobs_job_info (job_id, snoozes) VALUES (%(job_id)s, 1)
ON CONFLICT (job_id) DO UPDATE SET snoozes = jobs_job_info.snoozes + 1
RETURNING snoozes
"""
_OWNER = "SELECT owner_id FROM jobs_job_info WHERE job_id = %(job_id)s"
# Tracing only: the deferring span's context (migration 0013) and how long the job waited since it
# could first run (its scheduled time, or when it was deferred or put back for a retry). A webhook
# delivery is queued by the status trigger (migration 0006), without a context: it joins the trace
# of the job it reports on.
_TRACE_CONTEXT = """
SELECT COALESCE(job.trace_context,
                (SELECT origin.trace_context FROM procrastinate_jobs AS origin
                  WHERE job.task_name = 'jobs.webhook_deliver' AND origin.id = (job.args->>'job_id')::bigint))
           AS trace_context,
       EXTRACT(epoch FROM clock_timestamp() - GREATEST(job.scheduled_at,
           (SELECT max(event.at) FROM procrastinate_events AS event
             WHERE event.job_id = job.id AND event.type IN ('deferred', 'deferred_for_retry', 'retried'))))
           AS wait_seconds
  FROM procrastinate_jobs AS job
 WHERE job.id = %(job_id)s
"""


async def job_middleware(call_next, context: JobContext, worker) -> Any:
    if tracer() is None:  # tracing off: this check is all it costs
        return await _job_middleware(call_next, context, worker)
    return await _traced(call_next, context, worker)


async def _traced(call_next, context: JobContext, worker) -> Any:
    """The attempt as a span, a child of the span that deferred the job (its trace context is
    in the job row) or the root of its own trace. Each attempt is its own span: a retried job's
    attempts are siblings under the same parent."""
    job = context.job
    try:
        row = await context.app.connector.execute_query_one_async(_TRACE_CONTEXT, job_id=job.id)
    except Exception:  # tracing never stops a job: it runs in a trace of its own
        logger.warning("job %s: no trace context (the query failed)", job.id, exc_info=True)
        row = {"trace_context": None, "wait_seconds": None}
    attributes = {
        "job.id": job.id,
        "job.queue": job.queue,
        "job.task": job.task_name,
        "job.attempt": job.attempts + 1,
        "job.wait_seconds": max(0.0, float(row["wait_seconds"] or 0.0)),
        "messaging.system": "procrastinate",
        "messaging.destination.name": job.queue,
    }
    with job_span(f"job {job.task_name}", carrier=row["trace_context"], attributes=attributes) as span:
        try:
            result = await _job_middleware(call_next, context, worker)
        except Postponed as exc:
            span.set_attribute("job.outcome", "snoozed" if isinstance(exc, JobSnooze) else "postponed")
            raise
        except JobAborted:
            span.set_attribute("job.outcome", "aborted")
            raise
        except Exception as exc:
            span.set_attribute("job.outcome", "failed")
            span.set_attribute("job.will_retry", _retry_at(context, exc) is not None)
            span_failed(span, exc)
            raise
        span.set_attribute("job.outcome", "succeeded")
        return result


async def _job_middleware(call_next, context: JobContext, worker) -> Any:
    job = context.job
    options = task_options(job.task_name)
    connector = context.app.connector
    try:
        try:
            if options.rate_limits:
                await _take_rate_limit_tokens(context, options)
            result = await _run(call_next, context, options)
        except asyncio.CancelledError:
            # The worker cancels an aborted async job. When that is its own shutdown, say so
            # with JobAborted: Procrastinate then re-queues the job instead of ending it
            # `aborted` (it only retries a shutdown abort raised as JobAborted).
            if context.abort_reason() != AbortReason.SHUTDOWN:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            raise JobAborted(f"job {job.id} aborted ({context.abort_reason()})") from None
    except Postponed as exc:
        if isinstance(exc, JobSnooze):
            snoozes = (await connector.execute_query_one_async(_COUNT_SNOOZE, job_id=job.id))["snoozes"]
            if snoozes > options.max_snoozes:
                error = SnoozeLimitExceeded(
                    f"{job.task_name} snoozed {snoozes} times, more than its max_snoozes ({options.max_snoozes})"
                )
                await connector.execute_query_async(_STORE_ERROR, job_id=job.id, error=str(error))
                raise error from None
        await connector.execute_query_async(_UNCOUNT_ATTEMPT, job_id=job.id)
        _wake_at(worker, exc.retry_at)
        raise
    except JobAborted as exc:
        if context.abort_reason() == AbortReason.SHUTDOWN:
            # Not the job's fault: it goes back to the queue (JobRetryStrategy) as it was.
            if _retry_at(context, exc) is not None:
                await connector.execute_query_async(_UNCOUNT_ATTEMPT, job_id=job.id)
        else:
            await connector.execute_query_async(_STORE_ERROR, job_id=job.id, error="aborted on request")
        raise
    except Exception as exc:
        # Operators read it: no secret or address that an exception's text may carry.
        error = redact(f"{type(exc).__name__}: {exc}")[:2000]
        await connector.execute_query_async(_STORE_ERROR, job_id=job.id, error=error)
        _wake_at(worker, _retry_at(context, exc))
        raise
    if result is None and job.attempts:  # a result written with the end clears it too
        await connector.execute_query_async(_CLEAR_ERROR, job_id=job.id)
    return result


def _retry_at(context: JobContext, exc: BaseException) -> datetime | None:
    """When the job's retry strategy will run it again (the worker asks it the same question
    right after this), or None when it will not be retried."""
    task = context.app.tasks.get(context.job.task_name)
    strategy = task.retry_strategy if task else None
    if strategy is None:
        return None
    decision = strategy.get_retry_decision(exception=exc, job=context.job)
    if decision is None:
        return None
    return decision.retry_at or timezone.now()


def _wake_at(worker, when: datetime | None) -> None:
    """Make this worker look for jobs again at `when`. It relies on Procrastinate's private
    `_new_job_event` (set by NOTIFY); without it the worker still finds the job at its next poll."""
    event = getattr(worker, "_new_job_event", None)
    if when is None or event is None:
        return
    delay = max(0.0, (when - timezone.now()).total_seconds()) + 0.05
    asyncio.get_running_loop().call_later(delay, event.set)


async def _run(call_next, context: JobContext, options: TaskOptions) -> Any:
    """Run the job, giving up at its time limit or when it is asked to abort."""
    run = asyncio.ensure_future(call_next())
    time_limit = options.time_limit_seconds()
    deadline = time.monotonic() + time_limit if time_limit else None
    while True:
        timeout = ABORT_POLL_SECONDS if deadline is None else min(ABORT_POLL_SECONDS, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({run}, timeout=max(timeout, 0))
        except asyncio.CancelledError:  # the worker cancels an aborted async job: pass it on
            run.cancel()
            raise
        if done:
            return run.result()
        if context.should_abort():
            # An async task has been cancelled by the worker already; a sync one runs on in
            # its thread until it returns, but the job is given up now.
            run.cancel()
            raise JobAborted(f"job {context.job.id} aborted ({context.abort_reason()})")
        if deadline is not None and time.monotonic() >= deadline:
            run.cancel()
            error = TimeLimitExceeded(f"{context.job.task_name} still running after {time_limit:g} s")
            if options.on_time_limit is None or _retry_at(context, error) is not None:
                raise error
            # The last attempt: the task's own way out instead of a failure.
            return await asyncio.to_thread(_call_closing, options.on_time_limit, error=error, **context.job.task_kwargs)


def _call_closing(func, **kwargs) -> Any:
    """Call `func` in this (pool) thread, then close the database connection it opened here."""
    try:
        return func(**kwargs)
    finally:
        db_connection.close()


async def _take_rate_limit_tokens(context: JobContext, options: TaskOptions) -> None:
    job = context.job
    owner_id = None
    if any(limit.key == "owner" for limit in options.rate_limits):
        try:
            owner_id = (await context.app.connector.execute_query_one_async(_OWNER, job_id=job.id))["owner_id"]
        except Exception:  # no info row: the job has no owner
            owner_id = None
    buckets = [
        (key, limit)
        for limit in options.rate_limits
        if (key := limit.bucket(task_name=job.task_name, queue=job.queue, kwargs=job.task_kwargs, owner_id=owner_id))
    ]
    while True:
        if context.should_abort():  # e.g. the worker shut down while this job waited its turn
            raise JobAborted(f"job {job.id} aborted ({context.abort_reason()})")
        wait = await sync_to_async(_take_all, thread_sensitive=False)(buckets)
        if wait <= 0:
            return
        if wait > settings.JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS:
            raise Postponed(f"rate limited for {wait:.2f} s", retry_at=timezone.now() + timedelta(seconds=wait))
        await asyncio.sleep(wait)


def _take_all(buckets) -> float:
    """Take a token from every bucket, or none: returns 0, or the seconds until a retry may succeed."""
    taken = []
    for key, limit in buckets:
        wait = rate_limit_try_acquire(key=key, rate=limit.per_second, burst=limit.burst or limit.rate)
        if wait > 0:
            for done_key in taken:
                rate_limit_refund(key=done_key)
            return wait
        taken.append(key)
    return 0.0
