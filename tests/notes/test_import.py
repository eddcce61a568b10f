"""Bulk note import: the upload API, the streaming parsers, the batched job with real workers,
idempotence across retries and re-uploads, and a worker SIGKILLed in the middle of a file."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc

import psycopg
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from procrastinate.contrib.django import app

from jobs.models import JobBatch, JobInfo
from notes import import_formats, services
from notes.models import Note, NoteImport
from tests.factories import make_user
from tests.helpers import (
    client_for,
    database_url,
    jobs,
    kill_worker,
    run_worker,
    start_worker_process,
    stop_worker,
    wait_for,
)

URL = "/api/notes/import/"


def csv_bytes(rows: list[dict[str, str]], columns: tuple[str, ...] = ("title", "content", "tags")) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def jsonl_bytes(rows: list[object]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def upload(api, data: bytes, name: str = "notes.csv", content_type: str = "text/csv", **fields):
    return api.post(
        URL, {"file": SimpleUploadedFile(name, data, content_type=content_type), **fields}, format="multipart"
    )


def import_create(owner, data: bytes, fmt: str = "csv", **kwargs) -> NoteImport:
    return services.note_import_create(owner=owner, file=io.BytesIO(data), filename=f"x.{fmt}", format=fmt, **kwargs)


def stored_file(note_import: NoteImport) -> bytes:
    return bytes(NoteImport.objects.filter(id=note_import.id).values_list("data", flat=True).get())


def enrich_jobs() -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT j.id, (j.args->>'note_id')::bigint, j.priority, i.owner_id FROM procrastinate_jobs j"
            " LEFT JOIN jobs_job_info i ON i.job_id = j.id WHERE j.task_name = 'notes.enrich' ORDER BY j.id"
        )
        return [{"id": r[0], "note_id": r[1], "priority": r[2], "owner_id": r[3]} for r in cursor.fetchall()]


# --- The upload API ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_upload_answers_202_and_stores_the_file_and_its_job(api, user):
    data = csv_bytes([{"title": "One", "content": "first #a", "tags": "x"}])
    response = upload(api, data)

    assert response.status_code == 202, response.json()
    body = response.json()
    assert set(body) == {"import_id", "job_id", "status"}
    assert body["status"] == "pending"
    note_import = NoteImport.objects.get(id=body["import_id"])
    assert (note_import.owner, note_import.format, note_import.filename) == (user, "csv", "notes.csv")
    assert note_import.size == len(data)
    assert stored_file(note_import) == data  # byte for byte, in PostgreSQL
    [job] = jobs("notes.import")
    assert job["id"] == body["job_id"] == note_import.job_id
    assert (job["queue_name"], job["status"], job["args"]) == ("imports", "todo", {"import_id": note_import.id})
    assert job["lock"] == f"note-import:{note_import.id}"
    assert JobInfo.objects.get(job_id=job["id"]).owner_id == user.id
    assert Note.objects.count() == 0  # nothing is imported in the request


@pytest.mark.django_db
def test_the_stored_file_column_is_uncompressed_out_of_line_storage():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'notes_import'::regclass AND attname = 'data'"
        )
        assert cursor.fetchone() == ("e",)  # EXTERNAL: substring() reads only the slices it needs


@pytest.mark.django_db
def test_a_large_upload_is_stored_byte_for_byte(api):
    rows = [{"title": f"t{i}", "content": f"row {i} " + "x" * 200, "tags": ""} for i in range(15_000)]
    data = csv_bytes(rows)
    assert len(data) > 3_000_000  # above FILE_UPLOAD_MAX_MEMORY_SIZE: Django spools it to disk
    response = upload(api, data)
    assert response.status_code == 202
    assert stored_file(NoteImport.objects.get(id=response.json()["import_id"])) == data


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "content_type", "fields", "expected"),
    [
        ("notes.jsonl", "application/octet-stream", {}, "jsonl"),
        ("notes.ndjson", "", {}, "jsonl"),
        ("export", "application/x-ndjson", {}, "jsonl"),
        ("export", "text/csv; charset=utf-8", {}, "csv"),
        ("notes.txt", "text/plain", {"format": "jsonl"}, "jsonl"),
    ],
)
def test_the_format_comes_from_the_field_the_name_or_the_content_type(api, name, content_type, fields, expected):
    response = upload(api, jsonl_bytes([{"content": "a"}]), name=name, content_type=content_type, **fields)
    if expected == "csv":  # the same bytes read as CSV: a header with no content column
        assert response.status_code == 400
        assert "content" in response.json()["file"][0]
        return
    assert response.status_code == 202, response.json()
    assert NoteImport.objects.get().format == expected


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("data", "name", "content_type", "fields", "field"),
    [
        (b"", "notes.csv", "text/csv", {}, "file"),
        (b"title,content\nx,y\n", "notes.txt", "text/plain", {}, "format"),
        (b"title,content\nx,y\n", "notes.csv", "text/csv", {"format": "xml"}, "format"),
        (b"title,body,tags\nx,y,z\n", "notes.csv", "text/csv", {}, "file"),
        (b"title,content,Content\nx,y,z\n", "notes.csv", "text/csv", {}, "file"),
        (b"title,content\n", "notes.csv", "text/csv", {}, "file"),
        (b"\n\n", "notes.csv", "text/csv", {}, "file"),
        (b"\n  \n", "notes.jsonl", "application/jsonl", {}, "file"),
        (b"ti\xfftle,content\nx,y\n", "notes.csv", "text/csv", {}, "file"),
        (b"content\nx\n", "notes.csv", "text/csv", {"callback_url": "http://169.254.169.254/latest"}, "callback_url"),
        (b"content\nx\n", "notes.csv", "text/csv", {"callback_url": "not a url"}, "callback_url"),
    ],
)
def test_bad_uploads_are_refused_with_the_field_named(api, data, name, content_type, fields, field):
    response = upload(api, data, name=name, content_type=content_type, **fields)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert NoteImport.objects.count() == 0
    assert jobs() == []


@pytest.mark.django_db
def test_a_request_without_a_file_or_not_multipart_is_refused(api):
    response = api.post(URL, {"format": "csv"}, format="multipart")
    assert response.status_code == 400
    assert "file" in response.json()
    assert api.post(URL, {"content": "x"}, format="json").status_code == 415
    assert NoteImport.objects.count() == 0


@pytest.mark.django_db
def test_a_file_over_the_limit_is_refused_with_413(api, settings):
    settings.IMPORTS_MAX_UPLOAD_BYTES = 100
    small = b"content\n" + b"x\n" * 40
    assert upload(api, small).status_code == 202
    response = upload(api, b"content\n" + b"x\n" * 60)
    assert response.status_code == 413
    assert "100 bytes" in response.json()["file"][0]
    # A body far beyond the limit is refused from its Content-Length, before it is parsed.
    response = upload(api, b"content\n" + b"x\n" * 100_000)
    assert response.status_code == 413
    assert "file" in response.json()
    assert NoteImport.objects.count() == 1


@pytest.mark.django_db
def test_an_allowed_callback_url_is_kept_for_the_enrichment_batch(api, settings):
    # The webhook goes when the notes are enriched (the batch's callback), not when the rows are in.
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    response = upload(api, b"content\nx\n", callback_url="https://hooks.example.com/imports?k=1")
    assert response.status_code == 202
    assert JobInfo.objects.get(job_id=response.json()["job_id"]).callback_url == ""
    batch = JobBatch.objects.get(key=f"note-import:{response.json()['import_id']}")
    assert batch.callback_url == "https://hooks.example.com/imports?k=1"


@pytest.mark.django_db
def test_status_is_for_the_owner_only(api, user, other_user):
    import_id = upload(api, b"content\nx\n").json()["import_id"]

    response = api.get(f"{URL}{import_id}/")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == import_id
    assert body["status"] == "pending"
    assert (body["total"], body["processed"], body["imported"], body["errors"]) == (None, 0, 0, [])
    assert body["job_id"] == NoteImport.objects.get().job_id
    assert "data" not in body

    assert client_for(other_user).get(f"{URL}{import_id}/").status_code == 404
    assert api.get(f"{URL}{import_id + 1000}/").status_code == 404
    assert api.get(f"{URL}abc/").status_code == 404
    assert client_for(other_user).post(URL).status_code == 400  # not another user's import either


@pytest.mark.django_db
def test_anonymous_import_requests_are_refused():
    from rest_framework.test import APIClient

    assert APIClient().get(f"{URL}1/").status_code == 401
    assert APIClient().post(URL, {}, format="multipart").status_code == 401


# --- Parsing ----------------------------------------------------------------------------------


def _rows(data: bytes, fmt: str) -> list[import_formats.ImportRow | str]:
    with import_formats.open_text(io.BytesIO(data)) as text:
        return [import_formats.row_validate(record) for record in import_formats.read_records(text, fmt)]


def test_csv_keeps_quoted_multiline_fields_and_values_as_written():
    data = (
        b"\xef\xbb\xbf Title ,CONTENT,tags,external_id,extra\r\n"
        b'"=1+2","line one\r\nline ""two""\n, three",  #A b;c ,  ext-1 ,ignored\r\n'
        b"\r\n"
        b'plain,=HYPERLINK("http://x")\n'
    )
    first, second = _rows(data, "csv")
    assert first.line == 2
    assert first.title == "=1+2"  # never evaluated or stripped
    assert first.content == 'line one\r\nline "two"\n, three'
    assert first.tags == ["a", "b;c"]
    assert first.import_key == "ext-1"
    assert second.line == 6  # "\r\n" is one line end; the blank line is not a record
    assert second.content == '=HYPERLINK("http://x")'
    assert second.import_key == import_formats.import_key_of(title="plain", content='=HYPERLINK("http://x")')


def test_the_import_key_is_the_external_id_or_a_hash_of_title_and_content():
    key = import_formats.import_key_of(title="a", content="bc")
    assert key.startswith("sha256:") and len(key) == 71
    assert key != import_formats.import_key_of(title="ab", content="c")
    [row] = _rows(jsonl_bytes([{"content": "x", "external_id": 42}]), "jsonl")
    assert row.import_key == "42"


def test_a_field_longer_than_any_note_is_reported_not_buffered(settings):
    settings.NOTE_MAX_CONTENT_BYTES = 1000
    huge = b"a" * 500_000
    data = b"content\n" + b"ok\n" + huge + b"\n" + b"after\n" + b'"' + huge + b"\n" + huge + b'"\nlast\n'
    results = _rows(data, "csv")
    assert results[0].content == "ok"
    assert results[1] == f"a line is longer than {import_formats.line_limit()} characters"
    assert results[2].content == "after"
    assert all(isinstance(r, str) for r in results[3:-1])  # the quoted monster, in bounded pieces
    assert results[-1].content == "last"


# --- The job, with real workers ---------------------------------------------------------------

ROWS = [
    {"title": "Queues", "content": "Read https://example.com/q on #Postgres queues", "tags": "db, #Queues infra"},
    {"title": "=1+2", "content": "- [ ] buy milk\n- [ ] call Rita", "tags": ""},
    {"title": "", "content": 'Meeting notes:\n"quoted", with commas', "tags": "#work"},
]


@pytest.mark.django_db(transaction=True)
def test_csv_import_creates_notes_with_tier1_and_enrichment_jobs_in_bulk(settings):
    settings.IMPORTS_BATCH_SIZE = 2
    owner = make_user("ivy")
    note_import = import_create(owner, csv_bytes(ROWS))

    run_worker(queues=["imports"])

    note_import.refresh_from_db()
    assert note_import.status == "done"
    assert (note_import.total, note_import.processed, note_import.imported) == (3, 3, 3)
    assert (note_import.duplicates, note_import.skipped, note_import.errors) == (0, 0, [])
    assert note_import.started_at and note_import.finished_at
    notes = {n.title: n for n in Note.objects.filter(owner=owner)}
    queues = notes["Queues"]
    assert queues.tags == ["db", "queues", "infra", "postgres"]  # the file's tags, then the hashtags
    assert queues.links == ["https://example.com/q"]
    assert queues.word_count == 5
    assert queues.enrichment_status == "pending"
    assert notes["=1+2"].content == "- [ ] buy milk\n- [ ] call Rita"  # stored as text, as written
    assert notes["=1+2"].note_type == "task"
    assert notes[""].content == 'Meeting notes:\n"quoted", with commas'
    assert notes[""].note_type == "meeting"

    enrich = enrich_jobs()
    assert sorted(j["note_id"] for j in enrich) == sorted(n.id for n in notes.values())
    assert all(j["owner_id"] == owner.id and j["priority"] == services.IMPORT_ENRICH_PRIORITY for j in enrich)
    [job] = jobs("notes.import")
    assert job["status"] == "succeeded"
    info = JobInfo.objects.get(job_id=job["id"])
    assert (info.owner_id, info.processed, info.total) == (owner.id, 3, 3)
    assert info.progress == {"import_id": note_import.id, "imported": 3, "duplicates": 0, "skipped": 0}
    assert info.result["imported"] == 3 and info.result["status"] == "done"


@pytest.mark.django_db(transaction=True)
def test_jsonl_import_through_the_api(settings):
    owner = make_user("jack")
    rows = [
        {"title": "A", "content": "first #one", "tags": ["Two", "#three"], "external_id": "a-1"},
        {"content": "second", "tags": "x y", "external_id": 7},
        {"content": "third", "title": None, "tags": None},
    ]
    response = upload(client_for(owner), jsonl_bytes(rows), name="export.jsonl", content_type="application/jsonl")
    assert response.status_code == 202

    run_worker(queues=["imports"])

    body = client_for(owner).get(f"{URL}{response.json()['import_id']}/").json()
    assert (body["status"], body["total"], body["processed"], body["imported"]) == ("done", 3, 3, 3)
    by_key = {n.import_key: n for n in Note.objects.filter(owner=owner)}
    assert by_key["a-1"].tags == ["two", "three", "one"]
    assert by_key["7"].tags == ["x", "y"]
    assert by_key[import_formats.import_key_of(title="", content="third")].title == ""
    assert len(enrich_jobs()) == 3


@pytest.mark.django_db(transaction=True)
def test_malformed_rows_are_skipped_with_their_line_and_reason(settings):
    settings.NOTE_MAX_CONTENT_BYTES = 40
    settings.IMPORTS_BATCH_SIZE = 3
    owner = make_user("kim")
    data = (
        b"title,content,tags\n"
        b"ok,good one,\n"  # 2
        b"blank,   ,\n"  # 3
        b"big," + b"x" * 41 + b",\n"  # 4
        b"bad,caf\xe9 latin-1,\n"  # 5
        b"many,a,b,c\n"  # 6
        b"nul,a\x00b,\n"  # 7
        b'"multi\nline title",fine,"#t"\n'  # 8-9
        b"long," + b"y" * 10 + b"," + b"t" * 65 + b"\n"  # 10
        b"last,good two"  # 11, no final newline
    )
    note_import = import_create(owner, data)

    run_worker(queues=["imports"])

    note_import.refresh_from_db()
    assert note_import.status == "done"
    assert (note_import.total, note_import.imported, note_import.skipped) == (9, 3, 6)
    assert note_import.errors == [
        {"line": 3, "reason": "content is blank"},
        {"line": 4, "reason": "content is 41 bytes; the limit is 40 bytes"},
        {"line": 5, "reason": "content is not valid UTF-8"},
        {"line": 6, "reason": "4 fields, but the header has 3"},
        {"line": 7, "reason": "content contains a NUL character"},
        {"line": 10, "reason": "a tag is longer than 64 characters"},
    ]
    assert sorted(Note.objects.filter(owner=owner).values_list("content", flat=True)) == [
        "fine",
        "good one",
        "good two",
    ]


@pytest.mark.django_db(transaction=True)
def test_malformed_json_lines_are_skipped_with_their_line_and_reason():
    owner = make_user("lee")
    data = (
        b'{"content": "ok"}\n'  # 1
        b"{not json}\n"  # 2
        b"\n"  # 3: blank, not a row
        b'["content"]\n'  # 4
        b'{"content": 12}\n'  # 5
        b'{"content": "x", "tags": [1, 2]}\n'  # 6
        b'{"content": "x", "title": ["t"]}\n'  # 7
        b'{"content": "x", "external_id": true}\n'  # 8
        b'{"title": "no content"}\n'  # 9
        b'{"content": "caf\xe9"}\n'  # 10
        b'{"content": "\\u0000"}\n'  # 11
        b'{"content": "also ok", "unknown": {"kept": false}}\n'  # 12
    )
    note_import = import_create(owner, data, fmt="jsonl")

    run_worker(queues=["imports"])

    note_import.refresh_from_db()
    assert (note_import.total, note_import.imported, note_import.skipped) == (11, 2, 9)
    assert note_import.errors == [
        {"line": 2, "reason": "invalid JSON: Expecting property name enclosed in double quotes (column 2)"},
        {"line": 4, "reason": "expected a JSON object, got an array"},
        {"line": 5, "reason": "content must be a string, not a number"},
        {"line": 6, "reason": "tags must be a string or a list of strings"},
        {"line": 7, "reason": "title must be a string, not an array"},
        {"line": 8, "reason": "external_id must be a string or an integer, not a boolean"},
        {"line": 9, "reason": "content is missing"},
        {"line": 10, "reason": "the line is not valid UTF-8"},
        {"line": 11, "reason": "content contains a NUL character"},
    ]


@pytest.mark.django_db(transaction=True)
def test_the_same_file_uploaded_again_creates_nothing_new():
    owner = make_user("max")
    rows = [*ROWS, ROWS[0]]  # the file repeats a row: a duplicate, not an error
    first = import_create(owner, csv_bytes(rows))
    run_worker(queues=["imports"])
    first.refresh_from_db()
    assert (first.imported, first.duplicates, first.skipped) == (3, 1, 0)
    enrich_before = enrich_jobs()

    second = import_create(owner, csv_bytes(rows))
    someone_else = import_create(make_user("nina"), csv_bytes(rows))  # keys are per owner
    run_worker(queues=["imports"])

    second.refresh_from_db()
    someone_else.refresh_from_db()
    assert second.status == "done"
    assert (second.imported, second.duplicates, second.skipped) == (0, 4, 0)
    assert Note.objects.filter(owner=owner).count() == 3
    assert someone_else.imported == 3
    assert len(enrich_jobs()) == len(enrich_before) + 3  # only for the other user's new notes


@pytest.mark.django_db(transaction=True)
def test_rows_with_the_same_external_id_are_one_note():
    owner = make_user("olga")
    data = csv_bytes(
        [{"content": "v1", "external_id": "n-1"}, {"content": "v2", "external_id": "n-1"}],
        columns=("content", "external_id"),
    )
    note_import = import_create(owner, data)
    run_worker(queues=["imports"])
    note_import.refresh_from_db()
    assert (note_import.imported, note_import.duplicates) == (1, 1)
    assert list(Note.objects.filter(owner=owner).values_list("content", flat=True)) == ["v1"]


@pytest.mark.django_db(transaction=True)
def test_a_file_that_cannot_be_read_fails_the_import_without_retries():
    owner = make_user("pat")
    note_import = import_create(owner, b"title,body\nx,y\n")  # past the API's check: no content column

    run_worker(queues=["imports"])

    note_import.refresh_from_db()
    assert note_import.status == "failed"
    assert "no 'content' column" in note_import.failure_reason
    [job] = jobs("notes.import")
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert Note.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_running_a_finished_import_again_changes_nothing():
    owner = make_user("quinn")
    note_import = import_create(owner, csv_bytes(ROWS))
    run_worker(queues=["imports"])
    again = services.note_import_run(import_id=note_import.id)
    assert (again.status, again.imported, again.duplicates) == ("done", 3, 0)
    assert Note.objects.count() == 3
    assert len(enrich_jobs()) == 3


# --- Transactions ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_import_row_and_its_job_are_created_in_one_transaction():
    owner = make_user("rae")
    with pytest.raises(RuntimeError), transaction.atomic():
        note_import = import_create(owner, csv_bytes(ROWS))
        assert [j["args"] for j in jobs("notes.import")] == [{"import_id": note_import.id}]
        raise RuntimeError("the request failed after the write")
    assert NoteImport.objects.count() == 0
    assert jobs() == []

    note_import = import_create(owner, csv_bytes(ROWS))
    with psycopg.connect(database_url()) as other:  # both visible to everyone, together
        [(job_id,)] = other.execute(
            "SELECT j.id FROM procrastinate_jobs j JOIN notes_import i ON i.job_id = j.id"
            " WHERE (j.args->>'import_id')::bigint = i.id"
        ).fetchall()
    assert job_id == note_import.job_id


@pytest.mark.django_db(transaction=True)
def test_a_refused_callback_leaves_neither_row_nor_job(settings):
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    from core.errors import ApplicationError

    with pytest.raises(ApplicationError):
        import_create(make_user("sam"), csv_bytes(ROWS), callback_url="http://10.0.0.1/steal")
    assert NoteImport.objects.count() == 0
    assert jobs() == []


@pytest.mark.django_db
def test_each_batch_is_one_insert_and_one_bulk_defer(user, settings):
    settings.IMPORTS_BATCH_SIZE = 10
    rows = [{"title": f"n{i}", "content": f"note number {i}", "tags": ""} for i in range(35)]
    note_import = import_create(user, csv_bytes(rows))
    with CaptureQueriesContext(connection) as queries:
        services.note_import_run(import_id=note_import.id)
    sql = [q["sql"] for q in queries.captured_queries]
    assert len([s for s in sql if s.startswith('INSERT INTO "notes"')]) == 4
    # One statement per batch defers the enrichment jobs and writes their owner rows.
    bulk_defers = [s for s in sql if "INSERT INTO procrastinate_jobs" in s]
    assert len(bulk_defers) == 4 and all("INSERT INTO jobs_job_info" in s for s in bulk_defers)
    assert not any("jobs_job_info" in s for s in sql if s not in bulk_defers and s.lstrip().startswith("INSERT"))
    assert not any('"notes_import"."data"' in s for s in sql)  # the file is only read by substring()
    note_import.refresh_from_db()
    assert (note_import.imported, note_import.processed) == (35, 35)
    assert Note.objects.filter(import_key__isnull=False).count() == 35


@pytest.mark.django_db
def test_notes_written_through_the_api_have_no_import_key_and_may_repeat(api):
    for _ in range(2):
        assert api.post("/api/notes/", {"content": "same"}, format="json").status_code == 201
    assert list(Note.objects.values_list("import_key", flat=True)) == [None, None]


@pytest.mark.django_db
def test_skipped_rows_listed_are_capped_but_all_counted(user, monkeypatch):
    monkeypatch.setattr(services, "IMPORT_ERRORS_KEPT", 5)
    note_import = import_create(user, b"content\n" + b" \n" * 12 + b"ok\n")
    services.note_import_run(import_id=note_import.id)
    note_import.refresh_from_db()
    assert (note_import.skipped, note_import.imported, len(note_import.errors)) == (12, 1, 5)
    assert note_import.errors[0] == {"line": 2, "reason": "content is blank"}


@pytest.mark.django_db
def test_the_admin_shows_imports_read_only_without_the_file(client, user):
    client.force_login(make_user("root", is_staff=True, is_superuser=True))
    note_import = import_create(user, b"content\nsecret-file-body\n")

    page = client.get("/admin/notes/noteimport/")
    assert page.status_code == 200
    assert "x.csv" in page.content.decode()
    page = client.get(f"/admin/notes/noteimport/{note_import.id}/change/")
    assert page.status_code == 200
    assert b"secret-file-body" not in page.content
    assert b'name="_save"' not in page.content  # view only
    assert client.get("/admin/notes/noteimport/add/").status_code == 403


# --- Memory -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_file_is_imported_with_memory_bounded_by_the_batch_not_the_file(user, settings):
    settings.IMPORTS_BATCH_SIZE = 200
    filler = "lorem ipsum dolor sit amet " * 150  # ~4 KB a row
    out = io.BytesIO()
    out.write(b"title,content,external_id\n")
    for i in range(5000):
        out.write(f'n{i},"{filler} {i}",id-{i}\n'.encode())
    size = out.tell()
    note_import = services.note_import_create(owner=user, file=out, filename="big.csv", format="csv")
    del out

    tracemalloc.start()
    try:
        services.note_import_run(import_id=note_import.id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    note_import.refresh_from_db()
    assert (note_import.total, note_import.imported, note_import.skipped) == (5000, 5000, 0)
    assert size > 20_000_000
    assert peak < size / 2, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


# --- A worker killed in the middle of a file ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_import_whose_worker_is_sigkilled_mid_file_is_finished_without_duplicates():
    owner = make_user("tess")
    rows = [{"title": f"n{i}", "content": f"note {i} #bulk", "tags": ""} for i in range(200)]
    note_import = import_create(owner, csv_bytes(rows))
    env = {
        "IMPORTS_BATCH_SIZE": "50",
        "WORKER_HEARTBEAT_SECONDS": "0.5",
        "WORKER_STALLED_SECONDS": "2",
        "STALLED_JOBS_CRON": "* * * * * */1",  # every second
    }
    # Another session is inserting row 75's note and has not committed: the worker's second
    # batch waits on it (ON CONFLICT must know whether that row will exist) after committing the first.
    blocker = _insert_uncommitted(owner, title="n75", content="note 75 #bulk")

    doomed = start_worker_process("--queues", "imports", env=env)
    try:
        wait_for(lambda: NoteImport.objects.get(id=note_import.id).rows_done == 50, what="the first batch")
        wait_for(lambda: _backends_waiting_on_a_lock() > 0, what="the second batch to wait")
        kill_worker(doomed)
    finally:
        kill_worker(doomed)
        blocker.rollback()
        blocker.close()
    assert jobs("notes.import")[0]["status"] == "doing"  # nobody told the database
    assert Note.objects.filter(owner=owner).count() == 50

    rescuer = start_worker_process("--queues", "imports,maintenance", env=env)
    try:
        wait_for(
            lambda: NoteImport.objects.get(id=note_import.id).status == "done",
            timeout=40,
            what="the rescued import to finish",
        )
    finally:
        output = stop_worker(rescuer)
    note_import.refresh_from_db()
    assert (note_import.total, note_import.processed, note_import.imported) == (200, 200, 200), output
    assert (note_import.duplicates, note_import.skipped) == (0, 0)
    assert Note.objects.filter(owner=owner).count() == 200
    assert Note.objects.filter(owner=owner).values("import_key").distinct().count() == 200
    enrich = enrich_jobs()
    assert len(enrich) == 200 and len({j["note_id"] for j in enrich}) == 200  # one per note
    [job] = jobs("notes.import")
    assert job["status"] == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_an_operator_abort_stops_the_import_after_the_batch_in_flight():
    owner = make_user("uma")
    rows = [{"title": f"n{i}", "content": f"note {i} #bulk", "tags": ""} for i in range(200)]
    note_import = import_create(owner, csv_bytes(rows))
    blocker = _insert_uncommitted(owner, title="n75", content="note 75 #bulk")  # holds the second batch

    worker = start_worker_process("--queues", "imports", env={"IMPORTS_BATCH_SIZE": "50"})
    try:
        wait_for(lambda: NoteImport.objects.get(id=note_import.id).rows_done == 50, what="the first batch")
        wait_for(lambda: _backends_waiting_on_a_lock() > 0, what="the second batch to wait")
        assert app.job_manager.cancel_job_by_id(note_import.job_id, abort=True)
        wait_for(lambda: jobs("notes.import")[0]["status"] == "aborted", what="the worker to give the job up")
        blocker.rollback()  # the batch in flight commits; the next progress report stops the import
        wait_for(lambda: NoteImport.objects.get(id=note_import.id).status == "failed", what="the import to stop")
    finally:
        blocker.close()
        output = stop_worker(worker)
    note_import.refresh_from_db()
    assert (note_import.rows_done, note_import.imported) == (100, 100), output
    assert "aborted" in note_import.failure_reason
    assert Note.objects.filter(owner=owner).count() == 100
    assert jobs("notes.import")[0]["status"] == "aborted"


def _insert_uncommitted(owner, *, title: str, content: str) -> psycopg.Connection:
    """A session that has inserted the note of this row and not committed: an import's
    INSERT ... ON CONFLICT of the same row waits for it to end."""
    blocker = psycopg.connect(database_url())
    blocker.execute(
        "INSERT INTO notes (owner_id, title, content, content_version, word_count, tags, links, note_type,"
        " enrichment_status, enrichment_error, ai_type, ai_tags, summary, connections, created_at, updated_at,"
        " import_key) VALUES (%s, %s, %s, 1, 1, '{}', '{}', 'note', 'pending', '', '', '{}', '', '{}', now(), now(),"
        " %s)",
        [owner.id, title, content, import_formats.import_key_of(title=title, content=content)],
    )
    return blocker


def _backends_waiting_on_a_lock() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]
