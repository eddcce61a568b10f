"""GET /api/jobs/batches/{id}/stream/: a batch's progress as Server-Sent Events, fed by the
NOTIFY of migration 0010 (once per statement per watched batch), read by a real HTTP client from
a live ASGI server while a real worker runs the members and the callback.

The harness is the job streams' (the `asgi_server` fixture, tests.helpers.SseClient)."""

from __future__ import annotations

import json
from unittest.mock import ANY

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.db import connection

from jobs.console.services import job_batch_cancel, job_cancel
from jobs.console.stream import batch_event_stream, batch_stream_open
from jobs.console.stream_hub import batch_channel
from jobs.models import JobBatch
from jobs.tasking.defer import job_defer
from jobs.tasking.workflows import job_batch, job_batch_open, job_batch_seal, job_call
from tests.factories import make_user
from tests.helpers import SseClient, client_for, database_url, jobs, open_streams, run_worker, token_of, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.test_stream import count

pytestmark = pytest.mark.django_db(transaction=True)


def _batch(owner, members: int = 3, *, failing: int = 0) -> int:
    with job_batch(on_complete=job_call(tasks.batch_report), owner_id=owner.id, name="streamed") as batch:
        for n in range(members):
            job_defer(tasks.stamp_a, n=n)
        for _ in range(failing):
            job_defer(tasks.fail_permanently, reason="no")
    return batch.id


def _watched(batch_id: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM jobs_batch_watches WHERE batch_id = %s)", [batch_id])
        return cursor.fetchone()[0]


def _path(batch_id: int) -> str:
    return f"/api/jobs/batches/{batch_id}/stream/"


def _progress(state: str, total: int, succeeded: int = 0, failed: int = 0, cancelled: int = 0) -> dict:
    done = succeeded + failed + cancelled
    percent = round(done / total * 100, 1) if total else (100.0 if state == "done" else None)
    return {
        "state": state,
        "total": total,
        "done": done,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": cancelled,
        "percent": percent,
    }


def test_the_stream_relays_the_counts_as_members_end_and_ends_with_the_callbacks_job(asgi_server):
    owner = make_user("alice")
    batch_id = _batch(owner, 3, failing=1)
    client = SseClient(asgi_server.url, _path(batch_id), token_of(owner))
    try:
        assert client.next() == ("progress", _progress("sealed", 4))  # the current state first
        assert client.status == 200 and client.headers["content-type"].startswith("text/event-stream")
        assert client.headers["cache-control"] == "no-cache"
        assert _watched(batch_id)

        run_worker(queues=[tasks.QUEUE_A])  # the members, while the client listens
        events = client.until_closed()
    finally:
        client.close()
    batch = JobBatch.objects.get(id=batch_id)
    assert batch.state == "done" and len(batch.callback_job_ids) == 1
    final = _progress("done", 4, succeeded=3, failed=1)
    assert events[-2:] == [("progress", final), ("end", {**final, "callback_job_ids": batch.callback_job_ids})]
    # Each event is a statement that ended members (a worker may end several in one): the
    # counts only grow.
    dones = [data["done"] for kind, data in events if kind == "progress"]
    assert dones == sorted(dones) and len(set(dones)) == len(dones) and dones[0] == 0 and dones[-1] == 4
    wait_for(lambda: not _watched(batch_id), timeout=10, what="the watch to be removed")

    run_worker(queues=[tasks.QUEUE_B])  # the callback job is a real one, with the counts
    assert client_for(owner).get(f"/api/jobs/{batch.callback_job_ids[0]}/").json()["status"] == "succeeded"


def test_each_statement_ending_members_is_one_event(asgi_server):
    owner = make_user("abe")
    batch_id = _batch(owner, 3)
    member_ids = [j["id"] for j in jobs("tests.stamp_a")]
    assert len(member_ids) == 3
    client = SseClient(asgi_server.url, _path(batch_id), token_of(owner))
    try:
        assert client.next() == ("progress", _progress("sealed", 3))
        for ended, job_id in enumerate(member_ids, start=1):
            job_cancel(job_id=job_id)
            state = "done" if ended == 3 else "sealed"
            assert client.next() == ("progress", _progress(state, 3, cancelled=ended))
        assert client.until_closed()[-1] == ("end", {**_progress("done", 3, cancelled=3), "callback_job_ids": ANY})
    finally:
        client.close()


def test_the_stream_of_a_done_batch_sends_its_state_and_ends(asgi_server):
    owner = make_user("bob")
    batch_id = _batch(owner, 2)
    run_worker(queues=[tasks.QUEUE_A])
    callback_job_ids = JobBatch.objects.get(id=batch_id).callback_job_ids
    client = SseClient(asgi_server.url, _path(batch_id), token_of(owner))
    events = client.until_closed()
    client.close()
    final = _progress("done", 2, succeeded=2)
    assert events == [("progress", final), ("end", {**final, "callback_job_ids": callback_job_ids})]
    wait_for(lambda: not _watched(batch_id), timeout=10, what="the watch to be removed")


def test_an_open_batch_streams_its_growing_total_and_its_seal(asgi_server):
    owner = make_user("cy")
    batch_id = job_batch_open(owner_id=owner.id)
    client = SseClient(asgi_server.url, _path(batch_id), token_of(owner))
    try:
        assert client.next() == ("progress", _progress("open", 0))
        job_defer(tasks.stamp_a, batch_id=batch_id, n=1)
        assert client.next() == ("progress", _progress("open", 1))
        job_batch_seal(batch_id)
        assert client.next() == ("progress", _progress("sealed", 1))
        job_batch_cancel(batch_id=batch_id)
        final = _progress("done", 1, cancelled=1)
        assert client.until_closed()[-2:] == [("progress", final), ("end", {**final, "callback_job_ids": []})]
    finally:
        client.close()


def test_the_stream_of_another_users_batch_is_404(asgi_server):
    owner, intruder = make_user("dee"), make_user("eli")
    batch_id = _batch(owner, 1)
    client = SseClient(asgi_server.url, _path(batch_id), token_of(intruder))
    assert client.until_closed() == [("error", {"detail": "Not found."})]
    assert client.status == 404
    client.close()
    missing = SseClient(asgi_server.url, _path(10**9), token_of(intruder))
    assert missing.until_closed() == [("error", {"detail": "Not found."})]
    missing.close()
    assert not _watched(batch_id)


def test_batch_and_job_streams_share_the_users_cap(asgi_server, settings):
    settings.JOBS_STREAM_MAX_PER_USER = 1
    owner = make_user("fin")
    batch_id = _batch(owner, 1)
    job_id = job_defer(count, owner_id=owner.id, to=1)
    token = token_of(owner)
    held = SseClient(asgi_server.url, f"/api/jobs/{job_id}/stream/", token)
    try:
        assert held.next() == ("status", {"status": "todo"})
        refused = SseClient(asgi_server.url, _path(batch_id), token)
        assert refused.until_closed() == [
            ("error", {"detail": "You have 1 job streams open, the limit; close one first."})
        ]
        assert refused.status == 429 and int(refused.headers["retry-after"]) > 0
        refused.close()
        assert not _watched(batch_id)
    finally:
        held.close()
    wait_for(lambda: open_streams() == 0, timeout=10, what="the job stream's slot to be freed")
    again = SseClient(asgi_server.url, _path(batch_id), token)
    try:
        assert again.next() == ("progress", _progress("sealed", 1))
    finally:
        again.close()


def test_keepalives_then_the_maximum_duration_end_the_stream_without_end():
    owner = make_user("gus")
    batch_id = _batch(owner, 1)

    async def scenario() -> list[str]:
        subscription = await batch_stream_open(batch_id=batch_id, user_id=owner.id)
        return [chunk async for chunk in batch_event_stream(subscription, keepalive_seconds=0.1, max_seconds=0.35)]

    chunks = async_to_sync(scenario)()
    assert chunks[0].startswith("retry:") and chunks[1].startswith("event: progress\n")
    assert chunks[2:] and set(chunks[2:]) == {": keep-alive\n\n"}  # nothing ended: no polling, no event
    assert not _watched(batch_id)


class _Listener:
    """A LISTEN on a batch's channel from a connection of its own (as the hub's)."""

    def __init__(self, batch_id: int) -> None:
        self.conn = psycopg.connect(database_url(), autocommit=True)
        self.conn.execute(f'LISTEN "{batch_channel(batch_id)}"')

    def received(self) -> list[str]:
        return [notify.payload for notify in self.conn.notifies(timeout=0.5)]

    def close(self) -> None:
        self.conn.close()


def test_one_notification_per_statement_per_batch_and_none_unwatched():
    owner = make_user("hu")
    watched, unwatched = _batch(owner, 3), _batch(owner, 3)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO jobs_batch_watches (batch_id) VALUES (%s)", [watched])
    listeners = {watched: _Listener(watched), unwatched: _Listener(unwatched)}
    try:
        # One statement cancels the members of both batches: one NOTIFY for the watched one.
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE procrastinate_jobs SET status = 'cancelled' WHERE jobs_batch_id = ANY(%s) AND status = 'todo'",
                [[watched, unwatched]],
            )
        payloads = listeners[watched].received()
        assert len(payloads) == 1, payloads
        assert '"state" : "done"' in payloads[0] and '"cancelled" : 3' in payloads[0]
        assert listeners[unwatched].received() == []
        # A statement touching no batch member NOTIFYs nothing.
        plain = job_defer(tasks.stamp_a, n=9)
        with connection.cursor() as cursor:
            cursor.execute("UPDATE procrastinate_jobs SET status = 'cancelled' WHERE id = %s", [plain])
        assert listeners[watched].received() == []
    finally:
        for listener in listeners.values():
            listener.close()


def test_the_notification_carries_at_most_the_last_20_callback_job_ids():
    """A batch completed again and again: its NOTIFY stays far below PostgreSQL's 8000 bytes
    (past them, the statement that ends its members would fail)."""
    owner = make_user("ivo")
    batch_id = _batch(owner, 1)
    JobBatch.objects.filter(id=batch_id).update(callback_job_ids=list(range(10**12, 10**12 + 1000)))
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO jobs_batch_watches (batch_id) VALUES (%s)", [batch_id])
    listener = _Listener(batch_id)
    try:
        job_batch_cancel(batch_id=batch_id)
        [payload] = listener.received()
    finally:
        listener.close()
    ids = JobBatch.objects.get(id=batch_id).callback_job_ids
    assert len(ids) == 1001  # and the callback this completion deferred
    assert json.loads(payload)["callback_job_ids"] == ids[-20:]
