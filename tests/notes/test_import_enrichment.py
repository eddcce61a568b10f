"""An import's enrichment is a batch (issue 13): the import shows `enriched` with the counts, and
its completion webhook goes once, after the last note's enrichment has ended."""

from __future__ import annotations

import io

import pytest

from notes import services
from tests.factories import make_user
from tests.helpers import client_for, jobs, run_worker
from tests.jobs.test_webhooks import receiver, resolver  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)

CSV = b"title,content\na,first note\nb,second note\nc,third note\n"


def test_the_import_is_enriched_and_its_webhook_goes_once_after_the_last_note(receiver):  # noqa: F811
    owner = make_user("ivy")
    api = client_for(owner)
    note_import = services.note_import_create(
        owner=owner, file=io.BytesIO(CSV), filename="x.csv", format="csv", callback_url=receiver.url()
    )
    url = f"/api/notes/import/{note_import.id}/"

    run_worker(queues=["imports"])
    run_worker(queues=["webhooks"])
    body = api.get(url).json()
    assert body["status"] == "done"  # the rows are in; their enrichment waits
    assert body["enrichment"] == {"state": "sealed", "total": 3, "done": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert receiver.posts == []

    run_worker(queues=["enrichment"])  # no API key here: each note ends `skipped`, its job succeeded
    run_worker(queues=["imports"])  # the batch's callback
    run_worker(queues=["webhooks"])

    body = api.get(url).json()
    assert body["status"] == "enriched"
    assert body["enrichment"] == {"state": "done", "total": 3, "done": 3, "succeeded": 3, "failed": 0, "cancelled": 0}
    [post] = receiver.posts
    assert post.payload["task"] == "notes.import_enriched" and post.payload["status"] == "succeeded"
    assert post.payload["result"] == {
        "import_id": note_import.id,
        "status": "enriched",
        "total": 3,
        "imported": 3,
        "duplicates": 0,
        "skipped": 0,
        "enrichment": {"total": 3, "succeeded": 3, "failed": 0, "cancelled": 0},
    }
    assert len(jobs("notes.import_enriched")) == 1


def test_an_import_of_nothing_new_is_enriched_at_once():
    owner = make_user("ivy")
    for _ in range(2):
        note_import = services.note_import_create(owner=owner, file=io.BytesIO(CSV), filename="x.csv", format="csv")
        run_worker(queues=["imports"])
    run_worker(queues=["enrichment"])
    run_worker(queues=["imports"])
    body = client_for(owner).get(f"/api/notes/import/{note_import.id}/").json()
    assert (body["status"], body["duplicates"], body["enrichment"]["total"]) == ("enriched", 3, 0)


def test_a_failed_import_still_reports_once_through_its_batch(receiver):  # noqa: F811
    owner = make_user("pat")
    note_import = services.note_import_create(
        owner=owner, file=io.BytesIO(b"title,body\nx,y\n"), filename="x.csv", format="csv", callback_url=receiver.url()
    )  # past the API's check: no content column, so the import fails for good

    run_worker(queues=["imports"])  # the import fails; its (empty) batch completes at once
    run_worker(queues=["imports"])  # the batch's callback
    run_worker(queues=["webhooks"])

    body = client_for(owner).get(f"/api/notes/import/{note_import.id}/").json()
    assert body["status"] == "failed" and body["enrichment"]["state"] == "done"
    [post] = receiver.posts
    assert post.payload["result"]["status"] == "failed"
    assert post.payload["result"]["enrichment"] == {"total": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
