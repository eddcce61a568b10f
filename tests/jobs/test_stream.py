"""GET /api/jobs/{id}/stream/: Server-Sent Events fed by LISTEN/NOTIFY, read by a real HTTP
client from a live ASGI server (uvicorn, in this process: the `asgi_server` fixture) while a real
worker runs the job.

tests/jobs/test_stream_server.py runs the production server command itself (200 streams, caps)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection

from jobs.console.services import job_cancel
from jobs.console.stream import job_event_stream, job_stream_open
from jobs.console.stream_hub import MAX_BACKLOG, job_channel
from jobs.models import JobInfo
from jobs.tasking import queues
from jobs.tasking.defer import job_defer
from jobs.tasking.progress import job_progress
from jobs.tasking.registry import job_task
from tests.factories import make_user
from tests.helpers import SseClient, client_for, open_streams, run_worker, token_of, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@job_task(name="tests.stream.count", queue=queues.IMPORTS, pass_context=True)
def count(context, *, to: int) -> dict:
    for i in range(1, to + 1):
        job_progress(context, processed=i, total=to, last=i)
    return {"counted": to}


def _watched(job_id: int) -> bool:
    return JobInfo.objects.filter(job_id=job_id, watched=True).exists()


def test_stream_relays_progress_and_status_until_the_job_ends(asgi_server):
    owner = make_user("alice")
    job_id = job_defer(count, owner_id=owner.id, to=3)
    client = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token_of(owner))
    try:
        assert client.next() == ("status", {"status": "todo"})  # the current state first
        assert client.status == 200 and client.headers["content-type"].startswith("text/event-stream")
        assert client.headers["cache-control"] == "no-cache"
        assert _watched(job_id)

        run_worker(queues=["imports"])  # a real worker, while the client listens

        events = client.until_closed()
    finally:
        client.close()
    assert events == [
        ("status", {"status": "todo"}),
        ("status", {"status": "doing"}),
        ("progress", {"processed": 1, "total": 3, "percent": 33.3, "data": {"last": 1}}),
        ("progress", {"processed": 2, "total": 3, "percent": 66.7, "data": {"last": 2}}),
        ("progress", {"processed": 3, "total": 3, "percent": 100.0, "data": {"last": 3}}),
        ("status", {"status": "succeeded"}),
        ("end", {"status": "succeeded"}),
    ]
    wait_for(lambda: not _watched(job_id), timeout=10, what="watched to be reset")


def test_stream_of_a_finished_job_sends_its_state_and_ends(asgi_server):
    owner = make_user("bob")
    job_id = job_defer(count, owner_id=owner.id, to=2)
    run_worker(queues=["imports"])
    client = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token_of(owner))
    events = client.until_closed()
    client.close()
    assert events == [
        ("status", {"status": "succeeded"}),
        ("progress", {"processed": 2, "total": 2, "percent": 100.0, "data": {"last": 2}}),
        ("end", {"status": "succeeded"}),
    ]
    wait_for(lambda: not _watched(job_id), timeout=10, what="watched to be reset")


def test_stream_ends_when_the_job_is_cancelled(asgi_server):
    owner = make_user("carol")
    job_id = job_defer(count, owner_id=owner.id, to=2)
    client = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token_of(owner))
    try:
        assert client.next() == ("status", {"status": "todo"})
        job_cancel(job_id=job_id)
        assert client.until_closed()[1:] == [("status", {"status": "cancelled"}), ("end", {"status": "cancelled"})]
    finally:
        client.close()


def test_a_client_going_away_resets_watched_when_it_was_the_last_one(asgi_server, settings):
    settings.JOBS_STREAM_KEEPALIVE_SECONDS = 0.2  # the server notices a gone client at its next write
    owner = make_user("dan")
    job_id = job_defer(count, owner_id=owner.id, to=2)
    token = token_of(owner)
    first = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token)
    second = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token)
    try:
        assert first.next() == ("status", {"status": "todo"})
        assert second.next() == ("status", {"status": "todo"})
        wait_for(lambda: first.comments >= 2, timeout=10, what="keep-alive comments")

        assert open_streams() == 2
        first.close()
        wait_for(lambda: open_streams() == 1, timeout=10, what="the server to drop the first stream")
        # The second client still watches: the job stays watched and keeps notifying.
        assert _watched(job_id)
        run_worker(queues=["imports"])
        assert ("end", {"status": "succeeded"}) in second.until_closed()
    finally:
        first.close()
        second.close()
    wait_for(lambda: not _watched(job_id), timeout=10, what="watched to be reset")


def test_the_last_stream_going_away_mid_job_resets_watched(asgi_server, settings):
    settings.JOBS_STREAM_KEEPALIVE_SECONDS = 0.2
    owner = make_user("eve")
    job_id = job_defer(count, owner_id=owner.id, to=2)
    client = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token_of(owner))
    assert client.next() == ("status", {"status": "todo"})
    assert _watched(job_id)
    client.close()
    wait_for(lambda: not _watched(job_id), timeout=10, what="the server to notice and reset watched")
    assert open_streams() == 0


def test_stream_of_another_users_job_is_404(asgi_server):
    owner, intruder = make_user("fay"), make_user("gil")
    job_id = job_defer(count, owner_id=owner.id, to=1)
    client = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token_of(intruder))
    assert client.until_closed() == [("error", {"detail": "Not found."})]
    assert client.status == 404
    client.close()
    assert client_for(intruder).get(f"/api/jobs/{job_id}/stream/").status_code == 404
    assert not JobInfo.objects.get(job_id=job_id).watched


def test_the_stream_closes_cleanly_when_dropped_before_the_end():
    """What the server does when a client disconnects: close the iterator mid-stream."""
    owner = make_user("hal")
    job_id = job_defer(count, owner_id=owner.id, to=1)

    async def scenario() -> None:
        stream = job_event_stream(
            await job_stream_open(job_id=job_id, user_id=owner.id), keepalive_seconds=0.1, max_seconds=5
        )
        assert (await anext(stream)).startswith("retry:")
        assert await anext(stream) == 'event: status\ndata: {"status": "todo"}\n\n'
        assert await anext(stream) == ": keep-alive\n\n"
        assert await sync_to_async(_watched)(job_id)
        await stream.aclose()
        assert not await sync_to_async(_watched)(job_id)

    async_to_sync(scenario)()


def test_a_stream_never_started_still_gives_its_subscription_back():
    """A response that is never sent (the client left before the first byte)."""
    owner = make_user("ike")
    job_id = job_defer(count, owner_id=owner.id, to=1)

    async def scenario() -> None:
        stream = job_event_stream(await job_stream_open(job_id=job_id, user_id=owner.id))
        assert await sync_to_async(_watched)(job_id)
        del stream
        for _ in range(50):
            await asyncio.sleep(0.05)
            if not await sync_to_async(_watched)(job_id):
                return
        raise AssertionError("the dropped stream kept its watch")

    async_to_sync(scenario)()


def test_the_stream_stops_after_its_maximum_duration_without_an_end_event():
    owner = make_user("ida")
    job_id = job_defer(count, owner_id=owner.id, to=1)

    async def scenario() -> list[str]:
        subscription = await job_stream_open(job_id=job_id, user_id=owner.id)
        return [chunk async for chunk in job_event_stream(subscription, keepalive_seconds=0.1, max_seconds=0.35)]

    chunks = async_to_sync(scenario)()
    assert chunks[1] == 'event: status\ndata: {"status": "todo"}\n\n'
    assert chunks[2:] and set(chunks[2:]) == {": keep-alive\n\n"}
    assert not _watched(job_id)


def test_a_stream_without_credentials_is_401(asgi_server):
    owner = make_user("jo")
    job_id = job_defer(count, owner_id=owner.id, to=1)
    client = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", "not-a-token")
    assert client.until_closed() == [("error", {"detail": "Invalid token."})]
    assert client.status == 401
    client.close()
    assert not _watched(job_id)


def test_a_dropped_listening_connection_ends_the_streams_and_the_next_stream_reconnects(asgi_server):
    owner = make_user("kim")
    job_id = job_defer(count, owner_id=owner.id, to=2)
    token = token_of(owner)
    client = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token)
    assert client.next() == ("status", {"status": "todo"})
    with connection.cursor() as cursor:  # the process's listening connection: it holds the slots
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert cursor.rowcount == 1
    # Ended without `end`: EventSource reconnects and reads the state again.
    assert client.until_closed() == [("status", {"status": "todo"})]
    client.close()

    def reopened() -> SseClient | None:
        again = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token)
        if again.next() == ("status", {"status": "todo"}):
            return again
        assert again.received == [("error", {"detail": "Job streams cannot reach the database; retry later."})]
        again.close()  # a 503 while the hub backs off
        return None

    again = wait_for(reopened, timeout=30, interval=0.2, what="a stream after the reconnection")
    try:
        run_worker(queues=["imports"])
        assert again.until_closed()[-1] == ("end", {"status": "succeeded"})
    finally:
        again.close()
    wait_for(lambda: not _watched(job_id), timeout=10, what="watched to be reset")


def test_a_client_that_does_not_read_has_a_bounded_backlog_and_its_stream_ends():
    """A job reporting progress faster than its client reads (or a client that never reads):
    the stream's queue stops at MAX_BACKLOG, and the stream ends without `end` after it, so the
    client reconnects and reads the state afresh instead of the process holding every event."""
    owner = make_user("lee")
    job_id = job_defer(count, owner_id=owner.id, to=1)
    flood = 20 * MAX_BACKLOG

    async def scenario() -> tuple[int, list[str]]:
        subscription = await job_stream_open(job_id=job_id, user_id=owner.id)
        await sync_to_async(_notify_progress)(job_id, flood)
        for _ in range(100):  # until the hub has handed out what it will
            await asyncio.sleep(0.05)
            if subscription.overflowed:
                break
        backlog = subscription.events.qsize()
        chunks = [chunk async for chunk in job_event_stream(subscription, keepalive_seconds=5, max_seconds=5)]
        return backlog, chunks

    backlog, chunks = async_to_sync(scenario)()
    assert backlog <= MAX_BACKLOG + 1
    progress = [chunk for chunk in chunks if chunk.startswith("event: progress")]
    assert 0 < len(progress) <= MAX_BACKLOG
    assert not any(chunk.startswith("event: end") for chunk in chunks)
    assert not _watched(job_id)


def _notify_progress(job_id: int, times: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_notify(%s, json_build_object('type', 'progress', 'processed', i, 'total', %s)::text)"
            " FROM generate_series(1, %s) AS i",
            [job_channel(job_id), times, times],
        )
