"""The worker middleware: what the job layer does around every job a worker runs.

1. Rate limits (`RateLimit` in `job_task`): take a token from each bucket in PostgreSQL. A job
   whose token is close waits in place; otherwise it is postponed to when its token is due,
   without spending an attempt.
2. Time limit: past it the job fails with `TimeLimitExceeded` and follows its retry policy.
3. Abort: a sync task cannot be cancelled, so the middleware watches for an abort request
   (an operator's, or the worker's own shutdown after its grace period) and gives up waiting.
4. The returned value is stored as the job's result (JSON, with a retention time); a failure
   stores its error message. Both in `jobs_job_info`, next to progress.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone
from procrastinate import JobContext
from procrastinate.exceptions import JobAborted
from psycopg.types.json import Jsonb

from jobs.limits import TimeLimitExceeded
from jobs.ratelimit import rate_limit_refund, rate_limit_try_acquire
from jobs.registry import TaskOptions, task_options
from jobs.retry import Postponed

logger = logging.getLogger(__name__)

ABORT_POLL_SECONDS = 0.2

_STORE_RESULT = """
INSERT INTO jobs_job_info (job_id, result, result_expires_at)
VALUES (%(job_id)s, %(result)s, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (job_id) DO UPDATE SET result = EXCLUDED.result, result_expires_at = EXCLUDED.result_expires_at,
                                   error = ''
"""
_STORE_ERROR = """
INSERT INTO jobs_job_info (job_id, error) VALUES (%(job_id)s, %(error)s)
ON CONFLICT (job_id) DO UPDATE SET error = EXCLUDED.error
"""
# The retry that follows a postponement adds one attempt back: the two cancel out.
_UNCOUNT_ATTEMPT = "UPDATE procrastinate_jobs SET attempts = attempts - 1 WHERE id = %(job_id)s"
_OWNER = "SELECT owner_id FROM jobs_job_info WHERE job_id = %(job_id)s"


async def job_middleware(call_next, context: JobContext, worker) -> Any:
    job = context.job
    options = task_options(job.task_name)
    connector = context.app.connector
    try:
        if options.rate_limits:
            await _take_rate_limit_tokens(context, options)
        result = await _run(call_next, context, options)
    except Postponed:
        await connector.execute_query_async(_UNCOUNT_ATTEMPT, job_id=job.id)
        raise
    except Exception as exc:
        await connector.execute_query_async(_STORE_ERROR, job_id=job.id, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    if result is not None:
        ttl = options.result_ttl if options.result_ttl is not None else settings.JOBS_RESULT_TTL_SECONDS
        await connector.execute_query_async(_STORE_RESULT, job_id=job.id, result=Jsonb(_jsonable(result)), ttl=ttl)
    return result


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


async def _run(call_next, context: JobContext, options: TaskOptions) -> Any:
    """Run the job, giving up at its time limit or when it is asked to abort."""
    run = asyncio.ensure_future(call_next())
    deadline = time.monotonic() + options.time_limit if options.time_limit else None
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
            raise TimeLimitExceeded(f"{context.job.task_name} still running after {options.time_limit:g} s")


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
