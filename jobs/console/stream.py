"""A job's (or a batch's) progress and status as Server-Sent Events, pushed by PostgreSQL
(LISTEN/NOTIFY).

    GET /api/jobs/{id}/stream/

    event: status
    data: {"status": "todo"}

    event: progress
    data: {"processed": 3, "total": 10, "percent": 30.0, "data": {"imported": 3}}

    event: end
    data: {"status": "succeeded"}

    GET /api/jobs/batches/{id}/stream/

    event: progress
    data: {"state": "sealed", "total": 10, "done": 3, "succeeded": 2, "failed": 1, "cancelled": 0,
           "percent": 30.0}

    event: end
    data: {"state": "done", "total": 10, "done": 10, ..., "callback_job_ids": [812]}

A batch's counts are NOTIFYed once per statement that ends some of its members, after the
statement completed the batch if it did (migration 0010), only while someone streams it.

Served asynchronously (ASGI, see config/asgi.py): an open stream is a coroutine waiting on a
queue, fed by the process's one listening connection (jobs/console/stream_hub.py). It holds neither a
thread nor a database connection. Order matters so that nothing is missed: the hub LISTENs, marks
the job watched (from then on its status trigger and `job_progress` NOTIFY), then reads the
current state; the stream sends that state, then relays notifications as they come. There is no
polling: between notifications the stream sends a comment line every KEEPALIVE_SECONDS.

Several clients may watch one job, in one process or several. Each process streaming a job holds
a shared advisory lock on it; the last one out (the one that gets the exclusive lock) resets
`watched`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings

from jobs.console.selectors import FINAL_STATUSES, batch_progress, job_progress_summary
from jobs.console.stream_hub import StreamHub, Subscription, Topic, job_channel, stream_hub

__all__ = [
    "batch_event_stream",
    "batch_stream_open",
    "job_channel",
    "job_event_stream",
    "job_stream_open",
    "serve_streams_without_request_thread",
    "sse_event",
]

# settings.JOBS_STREAM_KEEPALIVE_SECONDS and JOBS_STREAM_MAX_SECONDS: a stream closes after the
# maximum (the browser's EventSource reconnects and gets the state again), so a forgotten tab
# does not hold a slot for days.
RECONNECT_MILLISECONDS = 3000
# Retry-After of a 429 beyond the stream caps: streams last long, a quick retry would fail again.
LIMIT_RETRY_AFTER_SECONDS = 30

STREAM_PATH = re.compile(r"^/api/jobs/(batches/)?\d+/stream/$")


def sse_event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def _progress(processed: int | None, total: int | None, data: Any) -> dict[str, Any]:
    summary = job_progress_summary(processed=processed, total=total) or {"percent": None}
    return {"processed": processed, "total": total, "percent": summary["percent"], "data": data or {}}


async def job_stream_open(*, job_id: int, user_id: int | None) -> Subscription:
    """Subscribe to the job within the caps (raises StreamLimitReached or StreamUnavailable).
    Check access before calling; hand the subscription to job_event_stream()."""
    return await _open(Topic("job", job_id), user_id)


async def batch_stream_open(*, batch_id: int, user_id: int | None) -> Subscription:
    """job_stream_open for a batch (the same caps: a batch stream is one of the user's streams);
    hand the subscription to batch_event_stream()."""
    return await _open(Topic("batch", batch_id), user_id)


async def _open(topic: Topic, user_id: int | None) -> Subscription:
    return await stream_hub().subscribe(
        topic=topic,
        user_id=user_id,
        max_per_user=settings.JOBS_STREAM_MAX_PER_USER,
        max_per_process=settings.JOBS_STREAM_MAX_PER_PROCESS,
    )


def job_event_stream(
    subscription: Subscription, *, keepalive_seconds: float | None = None, max_seconds: float | None = None
) -> AsyncIterator[str]:
    """The SSE text of one job until it ends (or `max_seconds`), then the subscription is released.

    Closing the iterator (the client went away) releases it too, and so does dropping it unstarted
    (a response never sent)."""
    return _stream(_JobEvents(), subscription, keepalive_seconds=keepalive_seconds, max_seconds=max_seconds)


def batch_event_stream(
    subscription: Subscription, *, keepalive_seconds: float | None = None, max_seconds: float | None = None
) -> AsyncIterator[str]:
    """The SSE text of one batch until it is done (`end`, with its callbacks' job ids) or
    `max_seconds`; released as job_event_stream's is."""
    return _stream(_BatchEvents(), subscription, keepalive_seconds=keepalive_seconds, max_seconds=max_seconds)


class _JobEvents:
    """A job's state row and notifications as SSE events; `done` once `end` was sent."""

    done = False

    def initial(self, state: tuple[Any, ...]) -> list[str]:
        status, processed, total, data = state
        events = [sse_event("status", {"status": status})]
        if processed is not None:
            events.append(sse_event("progress", _progress(processed, total, data)))
        return events + self._end(status)

    def relay(self, event: dict[str, Any]) -> list[str]:
        if event.get("type") == "progress":
            return [sse_event("progress", _progress(event.get("processed"), event.get("total"), event.get("data")))]
        if event.get("type") == "status":
            return [sse_event("status", {"status": event["status"]}), *self._end(event["status"])]
        return []

    def _end(self, status: str) -> list[str]:
        if status not in FINAL_STATUSES:
            return []
        self.done = True
        return [sse_event("end", {"status": status})]


class _BatchEvents:
    """A batch's counts as `progress` events, then `end` (with the callback job ids) once done."""

    done = False

    def initial(self, state: tuple[Any, ...]) -> list[str]:
        batch_state, total, succeeded, failed, cancelled, callback_job_ids = state
        return self._counts(batch_state, total, succeeded, failed, cancelled, callback_job_ids)

    def relay(self, event: dict[str, Any]) -> list[str]:
        if event.get("type") != "batch":
            return []
        return self._counts(
            event["state"], event["total"], event["succeeded"], event["failed"], event["cancelled"],
            event.get("callback_job_ids") or [],
        )  # fmt: skip

    def _counts(
        self, state: str, total: int, succeeded: int, failed: int, cancelled: int, callback_job_ids
    ) -> list[str]:
        progress = batch_progress(state=state, total=total, succeeded=succeeded, failed=failed, cancelled=cancelled)
        events = [sse_event("progress", progress)]
        if state == "done":
            self.done = True
            events.append(sse_event("end", {**progress, "callback_job_ids": list(callback_job_ids or [])}))
        return events


def _stream(
    kind: _JobEvents | _BatchEvents,
    subscription: Subscription,
    *,
    keepalive_seconds: float | None,
    max_seconds: float | None,
) -> AsyncIterator[str]:
    if keepalive_seconds is None:
        keepalive_seconds = settings.JOBS_STREAM_KEEPALIVE_SECONDS
    if max_seconds is None:
        max_seconds = settings.JOBS_STREAM_MAX_SECONDS
    events = _events(kind, subscription, keepalive_seconds=keepalive_seconds, max_seconds=max_seconds)
    weakref.finalize(events, _release_soon, asyncio.get_running_loop(), stream_hub(), subscription)
    return events


def _release_soon(loop: asyncio.AbstractEventLoop, hub: StreamHub, subscription: Subscription) -> None:
    # A finalizer: it may run in any thread, or after the loop is gone (its connection then too).
    if subscription.live and not loop.is_closed():
        loop.call_soon_threadsafe(hub.release_later, subscription)


async def _events(
    kind: _JobEvents | _BatchEvents, sub: Subscription, *, keepalive_seconds: float, max_seconds: float
) -> AsyncIterator[str]:
    try:
        if sub.state is None:
            yield sse_event("end", {"status": None} if sub.topic.kind == "job" else {"state": None})
            return
        yield f"retry: {RECONNECT_MILLISECONDS}\n\n"
        for text in kind.initial(sub.state):
            yield text
        if kind.done:
            return
        deadline = time.monotonic() + max_seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(sub.events.get(), timeout=min(keepalive_seconds, remaining))
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event is None:
                return  # the hub lost its connection: the client reconnects and reads the state again
            for text in kind.relay(event):
                yield text
            if kind.done:
                return
    finally:
        await stream_hub().release(sub)


def serve_streams_without_request_thread(django_app: Any, *, streams: Any | None = None) -> Any:
    """The ASGI application: Django's, except that a job or batch stream is handled outside a
    per-request thread context.

    Django runs each request in `ThreadSensitiveContext`, which gives the request a thread of its
    own for its sync parts (middleware, DRF's checks) and keeps it until the response is sent: for
    a stream, an idle thread for up to an hour. `handle()` is the same request handling without
    that context; a stream's few sync steps then run on asgiref's shared thread and return."""

    async def application(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and STREAM_PATH.match(scope.get("path", "")):
            await (streams or django_app).handle(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    return application
