"""An import created with `notify_email` e-mails its owner once, when its enrichment batch
completes (after the last note), through the exactly-once notification delivery: a real SMTP
server (tests/peers/smtp.py) and real workers."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from notes.models import NoteImport
from notes.tasks import note_import_enriched
from notifications.models import NotificationJob, Recipient
from tests.factories import make_user
from tests.helpers import client_for, jobs, run_worker

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/notes/import/"
CSV = b"title,content\na,first note\nb,second note\nc,third note\n"


def _import(owner, **fields) -> int:
    response = client_for(owner).post(
        URL, {"file": SimpleUploadedFile("week.csv", CSV, content_type="text/csv"), **fields}, format="multipart"
    )
    assert response.status_code == 202, response.content
    return response.json()["import_id"]


def _import_and_enrich() -> None:
    run_worker(queues=["imports"])  # the rows
    run_worker(queues=["enrichment"])  # no API key here: each note ends `skipped`, its job succeeded
    run_worker(queues=["imports"])  # the batch's callback
    run_worker(queues=["notifications"])


def test_the_owner_is_emailed_once_after_the_last_note_is_enriched(smtp):
    owner = make_user("ivy", email="ivy@example.com")
    import_id = _import(owner, notify_email="true")

    run_worker(queues=["imports"])  # the rows are in; their enrichment waits
    run_worker(queues=["notifications"])
    assert smtp.messages == []  # not when the rows are inserted

    run_worker(queues=["enrichment"])
    run_worker(queues=["imports"])  # the batch's callback queues the e-mail
    run_worker(queues=["notifications"])
    [message] = smtp.messages
    assert message["To"] == "ivy@example.com" and message["X-Envelope-To"] == "ivy@example.com"
    assert message["Subject"] == "Import week.csv is enriched"
    body = message.get_content()
    for line in ("Notes imported: 3", "Duplicates left out: 0", "Enrichment: 3 done, 0 failed, 0 cancelled, of 3"):
        assert line in body

    shown = client_for(owner).get(f"{URL}{import_id}/").json()
    assert shown["status"] == "enriched" and shown["notify_email"] is True
    notification = NotificationJob.objects.get(id=shown["email_notification_id"])
    assert (notification.status, notification.owner_id) == ("sent", owner.id)
    assert smtp.notification_ids() == [str(notification.id)]
    assert Recipient.objects.get(owner=owner).relationship == "self"

    # The callback runs again (a retry after its e-mail was queued): no second e-mail.
    [callback] = jobs("notes.import_enriched")
    note_import_enriched.defer(**callback["args"])  # as the batch's trigger defers it: the same args
    run_worker(queues=["imports"])
    run_worker(queues=["notifications"])
    assert len(jobs("notes.import_enriched")) == 2 and all(
        j["status"] == "succeeded" for j in jobs("notes.import_enriched")
    )
    assert len(smtp.messages) == 1
    assert NotificationJob.objects.count() == 1


def test_no_email_without_notify_email(smtp):
    owner = make_user("jon", email="jon@example.com")
    import_id = _import(owner)
    _import_and_enrich()
    note_import = NoteImport.objects.get(id=import_id)
    assert client_for(owner).get(f"{URL}{import_id}/").json()["status"] == "enriched"
    assert (note_import.notify_email, note_import.email_notification_id) == (False, None)
    assert smtp.messages == [] and not NotificationJob.objects.exists()


def test_notify_email_needs_an_address_and_a_boolean():
    owner = make_user("kai")  # no e-mail address
    api = client_for(owner)
    for value, error in (
        ("true", "Your account has no e-mail address to send it to."),
        ("maybe", "Must be a valid boolean."),
    ):
        response = api.post(
            URL, {"file": SimpleUploadedFile("x.csv", CSV, content_type="text/csv"), "notify_email": value},
            format="multipart",
        )  # fmt: skip
        assert response.status_code == 400, response.content
        assert response.json()["notify_email"] == [error], response.json()
    assert not NoteImport.objects.exists()
