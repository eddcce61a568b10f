"""A job's progress and status as Server-Sent Events, pushed by PostgreSQL (LISTEN/NOTIFY).

    GET /api/jobs/{id}/stream/

    event: status
    data: {"status": "todo"}

    event: progress
    data: {"processed": 3, "total": 10, "percent": 30.0, "data": {"imported": 3}}

    event: end
    data: {"status": "succeeded"}

The stream has its own psycopg connection (in autocommit), not Django's: it sits in LISTEN for
as long as the client stays. Order matters so that nothing is missed: LISTEN first, then mark
the job watched (from then on its status trigger and `job_progress` NOTIFY), then read the
current state and send it, then relay notifications as they come. There is no polling: between
notifications the connection waits in `notifies()`, and sends a comment line every
KEEPALIVE_SECONDS so a vanished client is noticed (the write fails and the server closes us).

Several clients may watch one job. Each holds a shared advisory lock on it while streaming; the
last one out (the one that gets the exclusive lock) resets `watched`.

Served by WSGI, each stream holds one thread: run gunicorn with threads (`--threads`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection
from psycopg import sql

from jobs.selectors import FINAL_STATUSES, job_progress_summary

logger = logging.getLogger(__name__)

# settings.JOBS_STREAM_KEEPALIVE_SECONDS and JOBS_STREAM_MAX_SECONDS: a stream closes after the
# maximum (the browser's EventSource reconnects and gets the state again), so a forgotten tab
# does not hold a database connection for days.
RECONNECT_MILLISECONDS = 3000

_LOCK_KEY = "SELECT hashtextextended('secondbrain-job-stream:' || %(job_id)s::text, 0)"
_WATCH = """
INSERT INTO jobs_job_info (job_id, watched) VALUES (%(job_id)s, true)
ON CONFLICT (job_id) DO UPDATE SET watched = true
"""
_UNWATCH = "UPDATE jobs_job_info SET watched = false WHERE job_id = %(job_id)s AND watched"
_STATE = """
SELECT CASE WHEN job.status = 'todo' AND job.scheduled_at > now() THEN 'scheduled' ELSE job.status::text END,
       info.processed, info.total, info.progress
  FROM procrastinate_jobs AS job
  LEFT JOIN jobs_job_info AS info ON info.job_id = job.id
 WHERE job.id = %(job_id)s
"""


def job_channel(job_id: int) -> str:
    return f"secondbrain_job_{job_id}"


def sse_event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def _progress(processed: int | None, total: int | None, data: Any) -> dict[str, Any]:
    summary = job_progress_summary(processed=processed, total=total) or {"percent": None}
    return {"processed": processed, "total": total, "percent": summary["percent"], "data": data or {}}


def _connect() -> psycopg.Connection:
    params = connection.get_connection_params()
    for django_only in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(django_only, None)
    return psycopg.connect(**params, autocommit=True)


def job_event_stream(
    *,
    job_id: int,
    keepalive_seconds: float | None = None,
    max_seconds: float | None = None,
) -> Iterator[str]:
    """The SSE text of one job until it ends (or `max_seconds`). Check access before calling.

    A generator: nothing happens until the first chunk is asked for, and closing it (the client
    went away) releases the connection and the watch."""
    if keepalive_seconds is None:
        keepalive_seconds = settings.JOBS_STREAM_KEEPALIVE_SECONDS
    if max_seconds is None:
        max_seconds = settings.JOBS_STREAM_MAX_SECONDS
    conn = _connect()
    lock_key = None
    try:
        lock_key = conn.execute(_LOCK_KEY, {"job_id": job_id}).fetchone()[0]
        conn.execute("SELECT pg_advisory_lock_shared(%s)", [lock_key])
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(job_channel(job_id))))
        try:
            conn.execute(_WATCH, {"job_id": job_id})
        except psycopg.errors.ForeignKeyViolation:  # the job was deleted meanwhile
            yield sse_event("end", {"status": None})
            return
        state = conn.execute(_STATE, {"job_id": job_id}).fetchone()
        if state is None:
            yield sse_event("end", {"status": None})
            return
        status, processed, total, data = state
        yield f"retry: {RECONNECT_MILLISECONDS}\n\n"
        yield sse_event("status", {"status": status})
        if processed is not None:
            yield sse_event("progress", _progress(processed, total, data))
        if status in FINAL_STATUSES:
            yield sse_event("end", {"status": status})
            return
        yield from _relay(conn, keepalive_seconds=keepalive_seconds, deadline=time.monotonic() + max_seconds)
    finally:
        _release(conn, job_id=job_id, lock_key=lock_key)


def _relay(conn: psycopg.Connection, *, keepalive_seconds: float, deadline: float) -> Iterator[str]:
    while (remaining := deadline - time.monotonic()) > 0:
        # list(): take the whole batch, so the generator (which holds the connection's lock)
        # is finished before we yield to the client.
        batch = list(conn.notifies(timeout=min(keepalive_seconds, remaining), stop_after=1))
        if not batch:
            yield ": keep-alive\n\n"
            continue
        for notify in batch:
            event = json.loads(notify.payload)
            if event.get("type") == "progress":
                yield sse_event("progress", _progress(event.get("processed"), event.get("total"), event.get("data")))
            elif event.get("type") == "status":
                yield sse_event("status", {"status": event["status"]})
                if event["status"] in FINAL_STATUSES:
                    yield sse_event("end", {"status": event["status"]})
                    return


def _release(conn: psycopg.Connection, *, job_id: int, lock_key: int | None) -> None:
    """Stop listening and, when no other stream watches this job, reset `watched`."""
    try:
        if lock_key is not None and not conn.closed:
            conn.execute("UNLISTEN *")
            conn.execute("SELECT pg_advisory_unlock_shared(%s)", [lock_key])
            # Taken only when no other stream holds its shared lock; a stream starting now
            # waits for it and marks the job watched again after us.
            if conn.execute("SELECT pg_try_advisory_lock(%s)", [lock_key]).fetchone()[0]:
                conn.execute(_UNWATCH, {"job_id": job_id})
                conn.execute("SELECT pg_advisory_unlock(%s)", [lock_key])
    except psycopg.Error:
        # Closing the connection releases its locks; `watched` left true only costs NOTIFYs.
        logger.warning("Could not reset the watch on job %s", job_id, exc_info=True)
    finally:
        conn.close()
