"""One LISTEN connection per web process, fanned out to the process's job streams.

A stream (jobs/console/stream.py) costs a queue here, not a connection: the hub's single psycopg
AsyncConnection (autocommit) LISTENs on the channel of every job that this process streams, and
hands each notification to the streams of that job. The same connection carries every other
statement a stream needs (its cap slot, the watch, the initial state), one stream after the
other: opening a stream never takes one of Django's pooled connections.

Caps (429 with Retry-After beyond them, see jobs/console/apis.py):
- per process, `JOBS_STREAM_MAX_PER_PROCESS`: counted here, in memory;
- per user, `JOBS_STREAM_MAX_PER_USER`, across every process: each stream holds one of the
  user's N slots, a session advisory lock on the hub's connection. PostgreSQL releases the
  locks of a process that crashed or lost its connection, so a slot is never left taken.

While the connection waits in `notifies()` it holds psycopg's connection lock; a statement
stops that wait first (cancelling the reader task: it is idle in a read of the socket, nothing
half-read) and starts it again after. Notifications that arrive meanwhile are kept by psycopg
and come out of the next `notifies()`.

The connection opens with the first stream and closes with the last. If it drops, every stream
of this process ends (without `end`: EventSource reconnects after the `retry:` delay and reads
the state afresh) and the next connection attempt waits an exponential backoff (0.5 s to 30 s);
a stream asked for meanwhile answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.db import connection
from psycopg import sql

from jobs.console.selectors import FINAL_STATUSES

logger = logging.getLogger(__name__)

BACKOFF_MIN_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
LOCK_TIMEOUT_MS = 5000
# Events a stream may have waiting for its client. A client that reads slower than its job
# reports progress (or not at all, its socket full) would otherwise grow the queue without
# bound; past this, the stream ends instead and the client reconnects to read the state afresh.
MAX_BACKLOG = 100

# The same key as before the hub: a process streaming a job holds it shared; the last process
# out (the one that gets it exclusively) resets `watched`.
_JOB_LOCK_KEY = "hashtextextended('secondbrain-job-stream:' || %(job_id)s::text, 0)"
_SLOT_KEY = "hashtextextended('secondbrain-job-stream-user:' || %(user_id)s::text || ':' || s::text, 0)"
# LIMIT 1 stops at the first slot whose lock is free: the others are not tried.
_TAKE_SLOT = f"SELECT s FROM unnest(%(slots)s::int[]) AS s WHERE pg_try_advisory_lock({_SLOT_KEY}) LIMIT 1"
_FREE_SLOT = f"SELECT pg_advisory_unlock({_SLOT_KEY}) FROM (SELECT %(slot)s::int AS s) AS slot"
# Only a job this connection can see: a job whose transaction has not committed yet has its
# jobs_job_info row uncommitted too, and upserting that row would wait for that transaction.
_WATCH = """
INSERT INTO jobs_job_info (job_id, watched) SELECT id, true FROM procrastinate_jobs WHERE id = %(job_id)s
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


class StreamLimitReached(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class StreamUnavailable(Exception):
    """The hub cannot reach the database (or waits out its backoff)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"job streams unavailable for {retry_after:.1f} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Subscription:
    job_id: int
    user_id: int | None
    # (status, processed, total, progress data) read after LISTEN and the watch; None: no such job.
    state: tuple[str, int | None, int | None, Any] | None = None
    slot: int | None = None
    # Notification payloads (dicts); None when the hub lost its connection.
    events: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    live: bool = False  # registered with the hub until release()
    overflowed: bool = False  # the backlog reached MAX_BACKLOG: ended, nothing more is queued

    def push(self, event: dict[str, Any]) -> None:
        if self.overflowed:
            return
        if self.events.qsize() >= MAX_BACKLOG:
            self.overflowed = True
            self.events.put_nowait(None)  # ends the stream once it reaches this point
            return
        self.events.put_nowait(event)


class StreamHub:
    def __init__(self) -> None:
        self._conn: psycopg.AsyncConnection | None = None
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one batch of statements at a time
        self._by_job: dict[int, set[Subscription]] = {}
        self._slots: dict[int, set[int]] = {}  # user id -> slots held by this process
        self._open = 0  # live subscriptions, plus those being opened
        self._backoff = 0.0
        self._retry_at = 0.0
        self._tasks: set[asyncio.Future] = set()

    def _keep(self, task: asyncio.Future) -> None:
        """A reference until the task is done (the loop only keeps a weak one)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def open_streams(self) -> int:
        return self._open

    async def subscribe(
        self, *, job_id: int, user_id: int | None, max_per_user: int, max_per_process: int
    ) -> Subscription:
        """Listen to the job, then read its state. Raises StreamLimitReached or StreamUnavailable.

        A subscription of a finished or missing job is returned already released; any other
        must be given back with release()."""
        if max_per_process and self._open >= max_per_process:
            raise StreamLimitReached(f"This server has {self._open} job streams open, its limit; retry later.")
        self._open += 1  # counted before the first await, so concurrent opens cannot overshoot
        opening = asyncio.ensure_future(self._subscribe(job_id=job_id, user_id=user_id, max_per_user=max_per_user))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The client left while we opened: let the opening finish, then give it back.
            opening.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, opening: asyncio.Future) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self.release_later(opening.result())

    def release_later(self, sub: Subscription) -> None:
        """release() from a callback (call it on the hub's loop)."""
        if sub.live:
            self._keep(asyncio.ensure_future(self.release(sub)))

    async def _subscribe(self, *, job_id: int, user_id: int | None, max_per_user: int) -> Subscription:
        sub = Subscription(job_id=job_id, user_id=user_id, live=True)
        try:
            async with self._lock:
                conn = await self._connection()
                await self._stop_reader()
                try:
                    await self._take(conn, sub, max_per_user=max_per_user)
                    cursor = await conn.execute(_STATE, {"job_id": job_id})
                    sub.state = await cursor.fetchone()
                except psycopg.Error as exc:
                    if conn.broken or conn.closed:
                        self._lose(str(exc).strip() or type(exc).__name__)
                        raise StreamUnavailable(self._retry_at - time.monotonic()) from None
                    # A statement failed (e.g. lock_timeout), the connection is fine: undo this one.
                    logger.warning("Could not open the stream of job %s: %s", job_id, exc)
                    await self._forget(conn, sub)
                    raise StreamUnavailable(1.0) from None
                finally:
                    self._start_reader()
        except BaseException:
            # Not registered (limit, no connection), or registered and wiped by _lose().
            sub.live = False
            self._open -= 1
            raise
        if sub.state is None or sub.state[0] in FINAL_STATUSES:
            await self.release(sub)  # nothing more will come
        return sub

    async def _take(self, conn: psycopg.AsyncConnection, sub: Subscription, *, max_per_user: int) -> None:
        if max_per_user and sub.user_id is not None:
            held = self._slots.setdefault(sub.user_id, set())
            # A session may take an advisory lock it already holds: skip this process's own slots.
            free = [s for s in range(max_per_user) if s not in held]
            row = await (await conn.execute(_TAKE_SLOT, {"user_id": sub.user_id, "slots": free})).fetchone()
            if row is None:
                raise StreamLimitReached(f"You have {max_per_user} job streams open, the limit; close one first.")
            sub.slot = row[0]
            held.add(sub.slot)
        subscribers = self._by_job.get(sub.job_id)
        if subscribers:
            subscribers.add(sub)
            return
        # Order matters: LISTEN, then the watch (the triggers NOTIFY from then on), then the
        # caller reads the state: no change falls between the state and the first event.
        self._by_job[sub.job_id] = {sub}
        await conn.execute(f"SELECT pg_advisory_lock_shared({_JOB_LOCK_KEY})", {"job_id": sub.job_id})
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(job_channel(sub.job_id))))
        with contextlib.suppress(psycopg.errors.ForeignKeyViolation):  # no such job: the state read says so
            await conn.execute(_WATCH, {"job_id": sub.job_id})

    async def release(self, sub: Subscription) -> None:
        """Give back the slot and, for the job's last stream here, the LISTEN and the watch."""
        if not sub.live:
            return
        sub.live = False
        self._open -= 1
        # Shielded: this runs in a stream's `finally`, often because its task was cancelled.
        await asyncio.shield(self._release(sub))

    async def _release(self, sub: Subscription) -> None:
        async with self._lock:
            conn = self._conn
            if conn is None:
                return  # the connection was lost meanwhile: PostgreSQL released everything
            await self._stop_reader()
            await self._forget(conn, sub)
            if not self._by_job:
                await self._close()  # the last stream of this process
            else:
                self._start_reader()

    async def _forget(self, conn: psycopg.AsyncConnection, sub: Subscription) -> None:
        """Undo what the subscription took. Call holding the lock, with the reader stopped."""
        subscribers = self._by_job.get(sub.job_id)
        last = False
        if subscribers is not None and sub in subscribers:
            subscribers.discard(sub)
            last = not subscribers
            if last:
                del self._by_job[sub.job_id]
        if sub.slot is not None:
            self._slots.get(sub.user_id, set()).discard(sub.slot)
        try:
            if sub.slot is not None:
                await conn.execute(_FREE_SLOT, {"user_id": sub.user_id, "slot": sub.slot})
            if last:
                await self._unwatch(conn, sub.job_id)
        except psycopg.Error:
            # Closing the connection releases its locks; `watched` left true only costs NOTIFYs.
            logger.warning("Could not release the stream of job %s", sub.job_id, exc_info=True)
            self._lose("a statement failed")

    async def _unwatch(self, conn: psycopg.AsyncConnection, job_id: int) -> None:
        params = {"job_id": job_id}
        await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(job_channel(job_id))))
        await conn.execute(f"SELECT pg_advisory_unlock_shared({_JOB_LOCK_KEY})", params)
        # Taken only when no other process streams this job; one starting now waits for it and
        # marks the job watched again after us.
        cursor = await conn.execute(f"SELECT pg_try_advisory_lock({_JOB_LOCK_KEY})", params)
        if (await cursor.fetchone())[0]:
            await conn.execute(_UNWATCH, params)
            await conn.execute(f"SELECT pg_advisory_unlock({_JOB_LOCK_KEY})", params)

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise StreamUnavailable(wait)
        params = connection.get_connection_params()  # Django's settings, TLS and timeouts included
        for django_only in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(django_only, None)
        # Every stream of the process waits while one statement does: none may wait long on a lock.
        params["options"] = f"{params.get('options', '')} -c lock_timeout={LOCK_TIMEOUT_MS}".strip()
        try:
            self._conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
        except psycopg.Error as exc:
            self._backoff = min(max(BACKOFF_MIN_SECONDS, self._backoff * 2), BACKOFF_MAX_SECONDS)
            self._retry_at = time.monotonic() + self._backoff
            logger.warning("Job streams cannot connect (next try in %.1f s): %s", self._backoff, exc)
            raise StreamUnavailable(self._backoff) from None
        self._backoff = 0.0
        return self._conn

    def _start_reader(self) -> None:
        if self._conn is not None and not self._conn.closed and self._by_job and self._reader is None:
            self._reader = asyncio.ensure_future(self._read(self._conn))

    async def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, conn: psycopg.AsyncConnection) -> None:
        try:
            async for notify in conn.notifies():
                self._dispatch(notify)
        except psycopg.Error as exc:
            if self._conn is conn:
                self._reader = None
                self._lose(str(exc).strip() or type(exc).__name__)

    def _dispatch(self, notify: psycopg.Notify) -> None:
        try:
            job_id = int(notify.channel.rsplit("_", 1)[1])
            event = json.loads(notify.payload)
        except (ValueError, IndexError):
            logger.warning("Unreadable notification on %s", notify.channel)
            return
        for sub in self._by_job.get(job_id, ()):
            sub.push(event)

    def _lose(self, reason: str) -> None:
        """The connection is gone (or not to be trusted): end every stream, back off."""
        logger.warning("Job streams lost their database connection (%s); their clients will reconnect", reason)
        conn, self._conn = self._conn, None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if conn is not None:
            self._keep(asyncio.ensure_future(_close_quietly(conn)))
        for subscribers in self._by_job.values():
            for sub in subscribers:
                sub.events.put_nowait(None)
        self._by_job.clear()
        self._slots.clear()
        self._backoff = min(max(BACKOFF_MIN_SECONDS, self._backoff * 2), BACKOFF_MAX_SECONDS)
        self._retry_at = time.monotonic() + self._backoff

    async def _close(self) -> None:
        await self._stop_reader()
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_quietly(conn)


async def _close_quietly(conn: psycopg.AsyncConnection) -> None:
    with contextlib.suppress(psycopg.Error):
        await conn.close()


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamHub] = weakref.WeakKeyDictionary()


def stream_hub() -> StreamHub:
    """This process's hub (one per event loop: a web process has one loop)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = StreamHub()
    return hub
