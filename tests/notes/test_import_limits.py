"""Bounds on stored import files: a finished import's file is deleted after its retention (the
row and its counts stay), and a user's unfinished uploads have a total size cap that parallel
uploads cannot race past."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from procrastinate.exceptions import AlreadyEnqueued

from notes import services
from notes.import_formats import ImportFileError
from notes.models import Note, NoteImport
from tests.factories import make_user
from tests.helpers import at_once, client_for, jobs, run_worker
from tests.notes.test_import import ROWS, csv_bytes, import_create, upload

pytestmark = pytest.mark.django_db(transaction=True)


def _stored_bytes(import_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT octet_length(data) FROM notes_import WHERE id = %s", [import_id])
        return cursor.fetchone()[0]


def _ended_hours_ago(import_id: int, hours: float) -> None:
    NoteImport.objects.filter(id=import_id).update(finished_at=timezone.now() - timedelta(hours=hours))


def _purge_with_a_real_worker() -> None:
    from core.tasks import purge_expired_rows

    with contextlib.suppress(AlreadyEnqueued):  # a worker that ran before deferred the periodic run
        purge_expired_rows.defer()
    run_worker(queues=["maintenance"])
    statuses = [j["status"] for j in jobs("core.purge_expired")]
    assert statuses and set(statuses) == {"succeeded"}


def test_a_finished_imports_file_is_deleted_after_its_retention_and_its_counts_stay(settings):
    settings.IMPORTS_FILE_RETENTION_HOURS = 24
    owner = make_user("ida")
    api = client_for(owner)
    data = csv_bytes(ROWS)
    old_done = upload(api, data).json()["import_id"]
    run_worker(queues=["imports"])
    young_done = upload(api, csv_bytes([{"title": "t", "content": "young"}])).json()["import_id"]
    run_worker(queues=["imports"])
    old_failed = import_create(owner, b"title,body\nx,y\n").id  # fails: no content column
    run_worker(queues=["imports"])
    pending = upload(api, csv_bytes([{"title": "p", "content": "waits"}])).json()["import_id"]
    assert NoteImport.objects.get(id=old_failed).status == "failed"
    for import_id in (old_done, old_failed):
        _ended_hours_ago(import_id, 25)
    NoteImport.objects.filter(id=pending).update(created_at=timezone.now() - timedelta(days=30))

    _purge_with_a_real_worker()

    assert _stored_bytes(old_done) == 0 and _stored_bytes(old_failed) == 0
    assert _stored_bytes(young_done) > 0 and _stored_bytes(pending) == len(
        csv_bytes([{"title": "p", "content": "waits"}])
    )
    shown = api.get(f"/api/notes/import/{old_done}/").json()
    assert (shown["status"], shown["imported"], shown["size"]) == ("done", 3, len(data))
    assert shown["file_deleted_at"] is not None
    assert api.get(f"/api/notes/import/{young_done}/").json()["file_deleted_at"] is None
    assert Note.objects.filter(owner=owner).count() == 4  # the notes stay


def test_running_an_import_whose_file_was_deleted_fails_with_the_reason(settings):
    owner = make_user("jay")
    note_import = import_create(owner, b"title,body\nx,y\n")
    run_worker(queues=["imports"])
    _ended_hours_ago(note_import.id, 1000)
    services.note_import_files_purge()

    with pytest.raises(ImportFileError, match="deleted"):
        services.note_import_run(import_id=note_import.id)


def test_unfinished_uploads_have_a_total_size_cap_per_user(settings):
    data = csv_bytes(ROWS)
    settings.IMPORTS_PENDING_MAX_BYTES = 2 * len(data) + 10
    owner, other = make_user("kim"), make_user("lou")
    api = client_for(owner)
    assert [upload(api, data).status_code for _ in range(2)] == [202, 202]

    refused = upload(api, data)

    assert refused.status_code == 429
    detail = refused.json()["detail"]
    assert f"{2 * len(data)} bytes" in detail and str(settings.IMPORTS_PENDING_MAX_BYTES) in detail
    assert "Retry-After" in refused.headers
    assert NoteImport.objects.filter(owner=owner).count() == 2  # nothing stored
    assert upload(client_for(other), data).status_code == 202  # a cap per user

    run_worker(queues=["imports"])  # finished imports no longer count
    assert upload(api, data).status_code == 202


def test_a_file_larger_than_the_pending_cap_is_413(settings):
    settings.IMPORTS_PENDING_MAX_BYTES = 10
    response = upload(client_for(make_user("max")), csv_bytes(ROWS))
    assert response.status_code == 413
    assert "10 bytes" in response.json()["file"][0]
    assert NoteImport.objects.count() == 0


def test_parallel_uploads_cannot_race_past_the_cap(settings):
    data = csv_bytes(ROWS)
    settings.IMPORTS_PENDING_MAX_BYTES = 2 * len(data) + 10  # room for two
    owner = make_user("ned")
    client_for(owner)  # its token, before the threads race
    statuses = at_once(6, lambda: upload(client_for(owner), data).status_code)
    assert sorted(statuses) == [202, 202, 429, 429, 429, 429]
    assert NoteImport.objects.filter(owner=owner).count() == 2
