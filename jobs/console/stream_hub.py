"""One LISTEN connection per web process, fanned out to the process's job and batch streams.

A stream (jobs/console/stream.py) costs a queue here, not a connection: the hub's single psycopg
AsyncConnection (autocommit) LISTENs on the channel of every job or batch (a `Topic`) that this
process streams, and hands each notification to the streams of that topic. The same connection carries every other
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

from config.database import direct_connection_params
from jobs.console.selectors import FINAL_STATUSES

logger = logging.getLogger(__name__)

BACKOFF_MIN_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
LOCK_TIMEOUT_MS = 5000
# Events a stream may have waiting for its client. A client that reads slower than its job
# reports progress (or not at all, its socket full) would otherwise grow the queue without
# bound; past this, the stream ends instead and the client reconnects to read the state afresh.
MAX_BACKLOG = 100

# The same key as before the hub: a process streaming a job (or batch) holds it shared; the last
# process out (the one that gets it exclusively) resets the watch.
_TOPIC_LOCK_KEY = "hashtextextended('secondbrain-' || %(kind)s || '-stream:' || %(id)s::text, 0)"
_SLOT_KEY = "hashtextextended('secondbrain-job-stream-user:' || %(user_id)s::text || ':' || s::text, 0)"
# LIMIT 1 stops at the first slot whose lock is free: the others are not tried.
_TAKE_SLOT = f"SELECT s FROM unnest(%(slots)s::int[]) AS s WHERE pg_try_advisory_lock({_SLOT_KEY}) LIMIT 1"
_FREE_SLOT = f"SELECT pg_advisory_unlock({_SLOT_KEY}) FROM (SELECT %(slot)s::int AS s) AS slot"


@dataclass(frozen=True)
class _TopicSql:
    """How a kind of topic is watched (its NOTIFYs turned on) and read."""

    watch: str
    unwatch: str
    state: str  # one row, its first column the status; no row: no such job or batch
    final: frozenset[str]  # statuses after which nothing more comes


_SQL = {
    # Only a job this connection can see: a job whose transaction has not committed yet has its
    # jobs_job_info row uncommitted too, and upserting that row would wait for that transaction.
    "job": _TopicSql(
        watch="""
INSERT INTO jobs_job_info (job_id, watched) SELECT id, true FROM procrastinate_jobs WHERE id = %(id)s
ON CONFLICT (job_id) DO UPDATE SET watched = true
""",
        unwatch="UPDATE jobs_job_info SET watched = false WHERE job_id = %(id)s AND watched",
        state="""
SELECT CASE WHEN job.status = 'todo' AND job.scheduled_at > now() THEN 'scheduled' ELSE job.status::text END,
       info.processed, info.total, info.progress
  FROM procrastinate_jobs AS job
  LEFT JOIN jobs_job_info AS info ON info.job_id = job.id
 WHERE job.id = %(id)s
""",
        final=frozenset(FINAL_STATUSES),
    ),
    # A row of its own, not a column of jobs_batches: the batch row is locked by every statement
    # that counts its members (and by an import's whole batch of rows), and the hub must not wait.
    "batch": _TopicSql(
        watch="""
INSERT INTO jobs_batch_watches (batch_id) SELECT id FROM jobs_batches WHERE id = %(id)s
ON CONFLICT (batch_id) DO NOTHING
""",
        unwatch="DELETE FROM jobs_batch_watches WHERE batch_id = %(id)s",
        state="""
SELECT state, total, succeeded, failed, cancelled, callback_job_ids FROM jobs_batches WHERE id = %(id)s
""",
        final=frozenset({"done"}),
    ),
}


@dataclass(frozen=True)
class Topic:
    """What a stream follows: a job or a batch, and its NOTIFY channel."""

    kind: str  # "job" or "batch"
    id: int

    @property
    def channel(self) -> str:
        return f"secondbrain_{self.kind}_{self.id}"

    @property
    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id}

    @classmethod
    def from_channel(cls, channel: str) -> Topic:
        _, kind, topic_id = channel.split("_")
        if kind not in _SQL:
            raise ValueError(channel)
        return cls(kind, int(topic_id))


def job_channel(job_id: int) -> str:
    return Topic("job", job_id).channel


def batch_channel(batch_id: int) -> str:
    return Topic("batch", batch_id).channel


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
    topic: Topic
    user_id: int | None
    # The topic's state row read after LISTEN and the watch (its first column the status); None:
    # no such job or batch. A job's: (status, processed, total, progress data); a batch's:
    # (state, total, succeeded, failed, cancelled, callback_job_ids).
    state: tuple[Any, ...] | None = None
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
        self._by_topic: dict[Topic, set[Subscription]] = {}
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
        self, *, topic: Topic, user_id: int | None, max_per_user: int, max_per_process: int
    ) -> Subscription:
        """Listen to the topic, then read its state. Raises StreamLimitReached or StreamUnavailable.

        A subscription of a finished or missing job (or batch) is returned already released; any
        other must be given back with release(). Job and batch streams share the caps."""
        if max_per_process and self._open >= max_per_process:
            raise StreamLimitReached(f"This server has {self._open} job streams open, its limit; retry later.")
        self._open += 1  # counted before the first await, so concurrent opens cannot overshoot
        opening = asyncio.ensure_future(self._subscribe(topic=topic, user_id=user_id, max_per_user=max_per_user))
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

    async def _subscribe(self, *, topic: Topic, user_id: int | None, max_per_user: int) -> Subscription:
        sub = Subscription(topic=topic, user_id=user_id, live=True)
        try:
            async with self._lock:
                conn = await self._connection()
                await self._stop_reader()
                try:
                    await self._take(conn, sub, max_per_user=max_per_user)
                    cursor = await conn.execute(_SQL[topic.kind].state, topic.params)
                    sub.state = await cursor.fetchone()
                except psycopg.Error as exc:
                    if conn.broken or conn.closed:
                        self._lose(str(exc).strip() or type(exc).__name__)
                        raise StreamUnavailable(self._retry_at - time.monotonic()) from None
                    # A statement failed (e.g. lock_timeout), the connection is fine: undo this one.
                    logger.warning("Could not open the stream of %s %s: %s", topic.kind, topic.id, exc)
                    await self._forget(conn, sub)
                    raise StreamUnavailable(1.0) from None
                finally:
                    self._start_reader()
        except BaseException:
            # Not registered (limit, no connection), or registered and wiped by _lose().
            sub.live = False
            self._open -= 1
            raise
        if sub.state is None or sub.state[0] in _SQL[topic.kind].final:
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
        topic = sub.topic
        subscribers = self._by_topic.get(topic)
        if subscribers:
            subscribers.add(sub)
            return
        # Order matters: LISTEN, then the watch (the triggers NOTIFY from then on), then the
        # caller reads the state: no change falls between the state and the first event.
        self._by_topic[topic] = {sub}
        await conn.execute(f"SELECT pg_advisory_lock_shared({_TOPIC_LOCK_KEY})", topic.params)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(topic.channel)))
        with contextlib.suppress(psycopg.errors.ForeignKeyViolation):  # no such job: the state read says so
            await conn.execute(_SQL[topic.kind].watch, topic.params)

    async def release(self, sub: Subscription) -> None:
        """Give back the slot and, for the topic's last stream here, the LISTEN and the watch."""
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
            if not self._by_topic:
                await self._close()  # the last stream of this process
            else:
                self._start_reader()

    async def _forget(self, conn: psycopg.AsyncConnection, sub: Subscription) -> None:
        """Undo what the subscription took. Call holding the lock, with the reader stopped."""
        subscribers = self._by_topic.get(sub.topic)
        last = False
        if subscribers is not None and sub in subscribers:
            subscribers.discard(sub)
            last = not subscribers
            if last:
                del self._by_topic[sub.topic]
        if sub.slot is not None:
            self._slots.get(sub.user_id, set()).discard(sub.slot)
        try:
            if sub.slot is not None:
                await conn.execute(_FREE_SLOT, {"user_id": sub.user_id, "slot": sub.slot})
            if last:
                await self._unwatch(conn, sub.topic)
        except psycopg.Error:
            # Closing the connection releases its locks; a watch left behind only costs NOTIFYs.
            logger.warning("Could not release the stream of %s %s", sub.topic.kind, sub.topic.id, exc_info=True)
            self._lose("a statement failed")

    async def _unwatch(self, conn: psycopg.AsyncConnection, topic: Topic) -> None:
        params = topic.params
        await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(topic.channel)))
        await conn.execute(f"SELECT pg_advisory_unlock_shared({_TOPIC_LOCK_KEY})", params)
        # Taken only when no other process streams this topic; one starting now waits for it and
        # watches again after us.
        cursor = await conn.execute(f"SELECT pg_try_advisory_lock({_TOPIC_LOCK_KEY})", params)
        if (await cursor.fetchone())[0]:
            await conn.execute(_SQL[topic.kind].unwatch, params)
            await conn.execute(f"SELECT pg_advisory_unlock({_TOPIC_LOCK_KEY})", params)

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise StreamUnavailable(wait)
        # Django's settings, TLS and timeouts included; behind a pooler PostgreSQL's own address
        # (LISTEN and session advisory locks need a session of their own).
        params = direct_connection_params(connection.get_connection_params())
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
        if self._conn is not None and not self._conn.closed and self._by_topic and self._reader is None:
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
            topic = Topic.from_channel(notify.channel)
            event = json.loads(notify.payload)
        except ValueError:
            logger.warning("Unreadable notification on %s", notify.channel)
            return
        for sub in self._by_topic.get(topic, ()):
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
        for subscribers in self._by_topic.values():
            for sub in subscribers:
                sub.events.put_nowait(None)
        self._by_topic.clear()
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
