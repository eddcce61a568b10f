"""Idempotency-Key (core/idempotency.py): a repeated POST returns the first response and creates
nothing; another body is a 422; a key whose first request still runs is a 409; keys expire."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import psycopg
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.utils import timezone

from core.models import IdempotencyKey
from core.services import expired_rows_purge
from digests.models import RecipientDigestSchedule
from jobs.tasking.defer import job_defer
from notes.models import Note, NoteImport
from notifications.models import NotificationJob, Recipient
from tests.factories import make_recipient, make_user
from tests.helpers import client_for, database_url, jobs, wait_for
from tests.jobs import tasks_for_tests as tasks

KEY = "HTTP_IDEMPOTENCY_KEY"


@dataclass
class Case:
    """One endpoint: how to POST to it and how to count what it creates."""

    post: Callable  # (client, body_variant, **headers) -> response
    count: Callable[[], int]


def _notes(user) -> Case:
    return Case(
        post=lambda c, v, **h: c.post("/api/notes/", {"content": f"idempotent note {v} #test"}, format="json", **h),
        count=lambda: Note.objects.filter(owner=user).count() + len(jobs("notes.enrich")),
    )


def _import(user) -> Case:
    def post(client, variant, **headers):
        upload = SimpleUploadedFile("notes.csv", f"content\nimported {variant}\n".encode(), content_type="text/csv")
        return client.post("/api/notes/import/", {"file": upload}, format="multipart", **headers)

    return Case(post=post, count=lambda: NoteImport.objects.filter(owner=user).count() + len(jobs("notes.import")))


def _send_email(user) -> Case:
    rita = make_recipient(user)
    return Case(
        post=lambda c, v, **h: c.post(
            "/api/notifications/send-email/",
            {"recipient_id": rita.id, "subject": "Hello", "body": f"Hi Rita {v}"},
            format="json",
            **h,
        ),
        count=lambda: NotificationJob.objects.filter(owner=user).count() + len(jobs("notifications.deliver")),
    )


def _send_bulk(user) -> Case:
    ids = [make_recipient(user, name=f"R{i}", email=f"r{i}@example.com").id for i in range(3)]
    return Case(
        post=lambda c, v, **h: c.post(
            "/api/notifications/send-bulk/",
            {"recipient_ids": ids, "subject": "Hello", "body": f"Hi all {v}"},
            format="json",
            **h,
        ),
        count=lambda: NotificationJob.objects.filter(owner=user).count() + len(jobs("notifications.deliver")),
    )


def _recipients(user) -> Case:
    return Case(
        post=lambda c, v, **h: c.post(
            "/api/recipients/", {"name": f"Sam {v}", "email": "sam@example.com"}, format="json", **h
        ),
        count=lambda: Recipient.objects.filter(owner=user).count(),
    )


def _digest_schedules(user) -> Case:
    rita = make_recipient(user)
    return Case(
        post=lambda c, v, **h: c.post(
            "/api/digest-schedules/",
            {"recipient_id": rita.id, "frequency": "daily", "delivery_time": f"08:{v:02d}", "timezone": "UTC"},
            format="json",
            **h,
        ),
        count=lambda: RecipientDigestSchedule.objects.filter(owner=user).count(),
    )


def _failed_job(user) -> int:
    job_id = job_defer(tasks.stamp_a, owner_id=user.id, n=0)
    with connection.cursor() as cursor:
        for status in ("doing", "failed"):  # Procrastinate's own transitions
            cursor.execute("UPDATE procrastinate_jobs SET status = %s WHERE id = %s", [status, job_id])
    return job_id


def _job_retry(user) -> Case:
    # The body does not vary here: the second variant retries another failed job (another path).
    ids = [_failed_job(user), _failed_job(user)]
    return Case(
        post=lambda c, v, **h: c.post(f"/api/jobs/{ids[v % 2]}/retry/", **h),
        count=lambda: sum(1 for j in jobs() if j["status"] == "todo"),
    )


def _notification_retry(user) -> Case:
    rita = make_recipient(user)
    client = client_for(user)
    ids = [
        client.post(
            "/api/notifications/send-email/", {"recipient_id": rita.id, "subject": "s", "body": "b"}, format="json"
        ).json()["job_id"]
        for _ in range(2)
    ]
    NotificationJob.objects.filter(id__in=ids).update(status="failed", error="SMTP 451")
    return Case(
        post=lambda c, v, **h: c.post(f"/api/notifications/jobs/{ids[v % 2]}/retry/", **h),
        count=lambda: len(jobs("notifications.deliver")),
    )


CASES = {
    "notes": _notes,
    "notes-import": _import,
    "send-email": _send_email,
    "send-bulk": _send_bulk,
    "recipients": _recipients,
    "digest-schedules": _digest_schedules,
    "jobs-retry": _job_retry,
    "notification-retry": _notification_retry,
}


@pytest.mark.django_db
@pytest.mark.parametrize("name", CASES)
def test_a_repeat_returns_the_first_response_and_creates_nothing(name, user, api):
    case = CASES[name](user)
    before = case.count()
    first = _with_key(case, api, 1, "key-1")
    assert 200 <= first.status_code < 300, first.content
    created = case.count()
    assert created > before

    again = _with_key(case, api, 1, "key-1")
    assert again.status_code == first.status_code
    assert again.content == first.content  # byte for byte, key order included
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert case.count() == created
    assert IdempotencyKey.objects.filter(user=user, key="key-1").count() == 1

    # The same key with another body (or, for retries, on another job): refused, nothing runs.
    other = _with_key(case, api, 2, "key-1")
    assert other.status_code == 422, other.content
    assert "Idempotency-Key" in other.json()["detail"]
    assert case.count() == created

    # A new key is a new request.
    assert 200 <= _with_key(case, api, 2, "key-2").status_code < 300
    assert case.count() > created


def _with_key(case: Case, client, variant: int, key: str):
    return case.post(client, variant, **{KEY: key})


@pytest.mark.django_db
def test_without_the_header_every_post_creates(user, api):
    for _ in range(2):
        assert api.post("/api/notes/", {"content": "twice"}, format="json").status_code == 201
    assert Note.objects.filter(owner=user).count() == 2
    assert not IdempotencyKey.objects.exists()


@pytest.mark.django_db
def test_the_same_body_in_another_key_order_is_the_same_request(user, api):
    first = api.post("/api/notes/", {"title": "t", "content": "c"}, format="json", **{KEY: "order"})
    again = api.post(
        "/api/notes/", data='{"content": "c", "title": "t"}', content_type="application/json", **{KEY: "order"}
    )
    assert again.status_code == 201 and again.content == first.content
    assert Note.objects.filter(owner=user).count() == 1


@pytest.mark.django_db
def test_another_endpoint_with_a_used_key_is_a_422(user, api):
    assert api.post("/api/notes/", {"content": "c"}, format="json", **{KEY: "k"}).status_code == 201
    response = api.post("/api/recipients/", {"name": "Sam", "email": "s@example.com"}, format="json", **{KEY: "k"})
    assert response.status_code == 422
    assert "POST /api/notes/" in response.json()["detail"]
    assert not Recipient.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there", "caf\u00e9"])
def test_a_malformed_key_is_a_400_naming_the_header(key, user, api):
    response = api.post("/api/notes/", {"content": "c"}, format="json", **{KEY: key})
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()
    assert not Note.objects.exists()


@pytest.mark.django_db
def test_the_longest_key_is_accepted(user, api):
    key = "k" * 255
    assert api.post("/api/notes/", {"content": "c"}, format="json", **{KEY: key}).status_code == 201
    assert IdempotencyKey.objects.get().key == key


@pytest.mark.django_db
def test_a_failed_request_stores_nothing_so_a_corrected_retry_runs(user, api):
    bad = api.post("/api/notes/", {"content": "   "}, format="json", **{KEY: "fix-me"})
    assert bad.status_code == 400
    assert not IdempotencyKey.objects.exists()
    good = api.post("/api/notes/", {"content": "now with content"}, format="json", **{KEY: "fix-me"})
    assert good.status_code == 201
    assert Note.objects.filter(owner=user).count() == 1


@pytest.mark.django_db
def test_a_domain_error_stores_nothing(user, api):
    job_id = job_defer(tasks.stamp_a, owner_id=user.id, n=0)  # waiting, not failed
    assert api.post(f"/api/jobs/{job_id}/retry/", **{KEY: "r"}).status_code == 409
    assert not IdempotencyKey.objects.exists()


@pytest.mark.django_db
def test_keys_belong_to_their_user(user, api, other_user):
    theirs = client_for(other_user)
    for client in (api, theirs):
        assert client.post("/api/notes/", {"content": "c"}, format="json", **{KEY: "shared"}).status_code == 201
    assert Note.objects.filter(owner=user).count() == 1
    assert Note.objects.filter(owner=other_user).count() == 1


@pytest.mark.django_db
def test_an_anonymous_request_with_a_key_is_still_a_401(client):
    response = client.post("/api/notes/", {"content": "c"}, content_type="application/json", **{KEY: "k"})
    assert response.status_code == 401
    assert not IdempotencyKey.objects.exists()


@pytest.mark.django_db
def test_the_key_is_documented_in_the_schema(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    for path in ("/api/notes/", "/api/notes/import/", "/api/notifications/send-email/", "/api/jobs/{id}/retry/"):
        operation = schema["paths"][path]["post"]
        assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in operation["parameters"]), path
        assert {"409", "422"} <= set(operation["responses"]), path
    assert not any(p["name"] == "Idempotency-Key" for p in schema["paths"]["/api/notes/"]["get"].get("parameters", []))


# --- expiry and the periodic purge ----------------------------------------------------------
@pytest.mark.django_db
def test_an_expired_key_is_free_again(user, api, settings):
    settings.IDEMPOTENCY_KEY_TTL_SECONDS = 60
    api.post("/api/notes/", {"content": "c"}, format="json", **{KEY: "old"})
    row = IdempotencyKey.objects.get()
    assert timedelta(seconds=59) < row.expires_at - row.created_at <= timedelta(seconds=60)
    IdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    again = api.post("/api/notes/", {"content": "other content"}, format="json", **{KEY: "old"})
    assert again.status_code == 201 and "Idempotent-Replayed" not in again
    assert Note.objects.filter(owner=user).count() == 2
    assert IdempotencyKey.objects.count() == 1


@pytest.mark.django_db
def test_the_purge_deletes_expired_keys_and_cache_rows_only(user, api):
    for key in ("a", "b", "c"):
        api.post("/api/notes/", {"content": key}, format="json", **{KEY: key})
    IdempotencyKey.objects.filter(key__in=["a", "b"]).update(expires_at=timezone.now() - timedelta(minutes=1))
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO core_cache (cache_key, value, expires) VALUES"
            " ('gone', 'x', now() - interval '1 minute'), ('live', 'x', now() + interval '1 minute')"
        )
    deleted = expired_rows_purge(batch_size=1)
    assert (deleted["idempotency_keys"], deleted["cache"]) == (2, 1)
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["c"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT cache_key FROM core_cache WHERE cache_key IN ('gone', 'live')")
        assert cursor.fetchall() == [("live",)]
    assert not any(expired_rows_purge().values())


@pytest.mark.django_db
def test_the_purge_is_a_periodic_maintenance_task(user, api):
    from procrastinate.contrib.django import app

    from core.tasks import purge_expired_rows

    api.post("/api/notes/", {"content": "c"}, format="json", **{KEY: "a"})
    IdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    task = app.tasks["core.purge_expired"]
    assert task.queue == "maintenance"
    assert any(p.task is task for p in app.periodic_registry.periodic_tasks.values())
    assert purge_expired_rows(timestamp=0)["idempotency_keys"] == 1
    assert not IdempotencyKey.objects.exists()


# --- concurrency: separate connections, real transactions ----------------------------------
def _post_in_thread(user, key: str, content: str, results: list, start: threading.Barrier | None = None):
    def run():
        from django.db import connection as thread_connection

        try:
            client = client_for(user)
            if start is not None:
                start.wait(timeout=10)
            response = client.post("/api/notes/", {"content": content}, format="json", **{KEY: key})
            results.append((response.status_code, response.content, response.headers.get("Retry-After")))
        except Exception as exc:  # e.g. its database session was killed
            results.append(("error", exc, None))
        finally:
            thread_connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# pg_locks is the whole server's: only this test database's locks (other test runs share the server).
_KEY_LOCKS = """
    SELECT pid FROM pg_locks
     WHERE locktype = 'advisory' AND granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _blocker() -> psycopg.Connection:
    """A session to hold a table lock; the server ends it after 30 s idle, should a test go wrong."""
    return psycopg.connect(database_url(), options="-c idle_in_transaction_session_timeout=30s")


def _advisory_locks_held() -> int:
    with connection.cursor() as cursor:
        cursor.execute(_KEY_LOCKS)
        return len(cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_a_key_whose_first_request_is_still_running_is_a_409_then_replays():
    user = make_user("carol")
    client_for(user)  # the token, before any thread needs it
    api = client_for(user)
    # Another session holds the notes table, so the first request stops inside its work.
    blocker = _blocker()
    try:
        blocker.execute("LOCK TABLE notes IN SHARE MODE")
        first: list = []
        thread = _post_in_thread(user, "slow", "the slow one", first)
        wait_for(lambda: _advisory_locks_held() >= 1, what="the first request to hold its key")

        meanwhile = api.post("/api/notes/", {"content": "the slow one"}, format="json", **{KEY: "slow"})
        assert meanwhile.status_code == 409
        assert meanwhile["Retry-After"] == "1"
        assert "still being processed" in meanwhile.json()["detail"]
    finally:
        blocker.rollback()
        blocker.close()
    thread.join(timeout=20)
    assert first and first[0][0] == 201

    again = api.post("/api/notes/", {"content": "the slow one"}, format="json", **{KEY: "slow"})
    assert again.status_code == 201 and again.content == first[0][1]
    assert Note.objects.filter(owner=user).count() == 1
    assert len(jobs("notes.enrich")) == 1


@pytest.mark.django_db(transaction=True)
def test_identical_requests_at_the_same_moment_create_one_note():
    user = make_user("dave")
    client_for(user)
    results: list = []
    start = threading.Barrier(4)
    threads = [_post_in_thread(user, "race", "raced", results, start) for _ in range(4)]
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 4
    assert Note.objects.filter(owner=user).count() == 1
    assert len(jobs("notes.enrich")) == 1
    created = [content for status, content, _ in results if status == 201]
    assert created and all(content == created[0] for content in created)
    assert all(status in (201, 409) for status, _, _ in results), results
    assert IdempotencyKey.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_crash_inside_the_work_leaves_neither_the_key_nor_the_work():
    """The key row commits with the work: a request whose transaction dies stores nothing."""
    user = make_user("erin")
    api = client_for(user)
    blocker = _blocker()
    try:
        blocker.execute("LOCK TABLE notes IN SHARE MODE")
        first: list = []
        thread = _post_in_thread(user, "doomed", "doomed", first)
        wait_for(lambda: _advisory_locks_held() >= 1, what="the request to hold its key")
        # Kill the request's database session mid-work, as a dying web process would.
        blocker.execute(f"SELECT pg_terminate_backend(pid) FROM ({_KEY_LOCKS}) AS held")
    finally:
        blocker.rollback()
        blocker.close()
    thread.join(timeout=20)
    assert first and first[0][0] in ("error", 503)  # its session was gone (503 where core's middleware says so)
    assert not Note.objects.exists()
    assert not IdempotencyKey.objects.exists()
    retry = api.post("/api/notes/", {"content": "doomed"}, format="json", **{KEY: "doomed"})
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry
    assert Note.objects.count() == 1


@pytest.mark.django_db
def test_deeply_nested_json_with_a_key_is_a_400_never_a_500(user, api):
    """The parser takes nesting up to Python's recursion limit; hashing the body for the key
    recursed twice as deep and raised RecursionError (a 500) from about half of that."""
    answers = {}
    for depth in [100_000, *range(50, 1001, 50)]:
        for shape, body in (
            ("list", '{"content": "deep", "x": ' + "[" * depth + "]" * depth + "}"),
            ("object", '{"content": "deep", "x": ' + '{"a":' * depth + "1" + "}" * depth + "}"),
        ):
            response = api.post("/api/notes/", data=body, content_type="application/json", **{KEY: f"{shape}{depth}"})
            answers[shape, depth] = response.status_code
            if response.status_code == 400:
                assert response.json() == {"detail": "JSON parse error - nested too deeply."}
    assert set(answers.values()) <= {201, 400}, answers
    assert answers["list", 50] == answers["object", 50] == 201
    assert answers["list", 100_000] == answers["object", 100_000] == 400
