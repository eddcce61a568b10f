"""The right to erasure: a user deleted after a full flow (notes enriched by a real worker, an
import, e-mails sent and one still queued, an idempotency key, throttle counters) leaves nothing
of theirs in any table, and every other user's data stays. A note deleted cancels its queued
enrichment in the same transaction."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from jobs.models import JobInfo
from notes import services as note_services
from notes.models import Note
from tests.factories import make_recipient, make_user
from tests.helpers import client_for, jobs, run_worker

pytestmark = pytest.mark.django_db(transaction=True)

USER_ID = 987654321  # unmistakable in any row's text
PASSWORD = "correct-horse-battery"
MARKERS = (str(USER_ID), "erasure-zq", "zq-marker", "zq-rcpt")


def _rows_with(marker: str) -> dict[str, int]:
    """Every table of the database (Django's, Procrastinate's, ours) whose rows mention `marker`."""
    found = {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT quote_ident(table_name) FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        for (table,) in cursor.fetchall():
            cursor.execute(f"SELECT count(*) FROM {table} AS t WHERE t::text LIKE %s", [f"%{marker}%"])
            count = cursor.fetchone()[0]
            if count:
                found[table] = count
    return found


def _full_flow(user) -> None:
    api = client_for(user)
    created = api.post(
        "/api/notes/", {"content": "zq-marker first note"}, format="json", HTTP_IDEMPOTENCY_KEY="zq-marker-key"
    )
    assert created.status_code == 201, created.content
    upload = b"title,content\nzq-marker one,zq-marker imported\nzq-marker two,zq-marker imported too\n"
    imported = api.post("/api/notes/import/", {"file": _file(upload)}, format="multipart")
    assert imported.status_code == 202, imported.content
    recipient = make_recipient(user, name="zq-rcpt", email="zq-rcpt@example.test")
    for scheduled_for in (None, (timezone.now() + timezone.timedelta(days=1)).isoformat()):
        sent = api.post(
            "/api/notifications/send-email/",
            {"recipient_id": recipient.id, "subject": "zq-marker", "body": "zq-marker body"}
            | ({"scheduled_for": scheduled_for} if scheduled_for else {}),
            format="json",
        )
        assert sent.status_code == 202, sent.content
    run_worker()  # enrichment, the import and its notes' enrichments, the first e-mail


def _file(data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("zq-marker.csv", data, content_type="text/csv")


def test_deleting_a_user_after_a_full_flow_leaves_nothing_of_theirs(claude, smtp, settings):
    settings.THROTTLE_USER_RATE = "1000/min"  # so the user has throttle counters too
    user = get_user_model().objects.create_user(
        id=USER_ID, username="erasure-zq", email="erasure-zq@example.test", password=PASSWORD
    )
    keeper = make_user("keeper")
    kept_note = note_services.note_create(owner=keeper, content="the keeper's note")
    _full_flow(user)
    assert len(smtp.messages) == 1
    their_jobs = set(JobInfo.objects.filter(owner_id=USER_ID).values_list("job_id", flat=True))
    assert {job["status"] for job in jobs() if job["id"] in their_jobs} >= {"succeeded", "todo"}
    for marker in MARKERS:  # the scan finds what is there
        assert _rows_with(marker), marker

    refused = client_for(user).post("/api/auth/erase/", {"password": "wrong"}, format="json")
    assert refused.status_code == 400 and "password" in refused.json(), refused.content
    assert get_user_model().objects.filter(id=USER_ID).exists()

    erased = client_for(user).post("/api/auth/erase/", {"password": PASSWORD}, format="json")
    assert erased.status_code == 204, erased.content

    assert {marker: _rows_with(marker) for marker in MARKERS} == {marker: {} for marker in MARKERS}
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM procrastinate_jobs WHERE id = ANY(%s)", [list(their_jobs)])
        assert cursor.fetchone()[0] == 0
        cursor.execute("SELECT count(*) FROM procrastinate_events WHERE job_id = ANY(%s)", [list(their_jobs)])
        assert cursor.fetchone()[0] == 0
    # Everyone else's stays: the keeper's note and its job.
    assert Note.objects.filter(id=kept_note.id).exists()
    assert [job["args"] for job in jobs("notes.enrich")] == [{"note_id": kept_note.id}]


def test_deleting_a_note_cancels_its_queued_enrichment_in_the_same_transaction(user):
    doomed = note_services.note_create(owner=user, content="to be deleted")
    kept = note_services.note_create(owner=user, content="to be kept")
    response = client_for(user).delete(f"/api/notes/{doomed.id}/")
    assert response.status_code == 204
    statuses = {job["args"]["note_id"]: job["status"] for job in jobs("notes.enrich")}
    assert statuses == {doomed.id: "cancelled", kept.id: "todo"}
