"""Hostile and malformed input: every case gets a clear 4xx (or a skipped row with a reason),
never a 500, and text is stored and shown as text.

Oversized bodies, deeply nested JSON, invalid UTF-8 and lone surrogates in JSON, the same in
CSV and JSON-lines imports, huge CSV lines, CSV formula injection, and HTML in notes as it
reaches e-mails (plain text) and the admin (escaped).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tracemalloc
import urllib.request
from datetime import UTC, datetime, time, timedelta
from time import sleep

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from digests import services as digest_services
from notes import import_formats
from notes import services as note_services
from notes.models import Note, NoteImport
from notifications import services as notification_services
from tests.factories import make_recipient, make_user
from tests.helpers import BASE_DIR, client_for, database_url, run_worker

JSON_ENDPOINTS = ["/api/notes/", "/api/recipients/", "/api/notifications/send-email/", "/api/auth/token/"]
SCRIPT = "<script>alert('owned')</script>"


def _post(client: Client | APIClient, path: str, body: bytes, content_type: str = "application/json"):
    return client.post(path, data=body, content_type=content_type)


# --- Request bodies ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", JSON_ENDPOINTS)
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_body_over_data_upload_max_memory_size_is_a_413(api, settings, path, content_type):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    if content_type.startswith("multipart"):
        body = b'--x\r\nContent-Disposition: form-data; name="content"\r\n\r\n' + b"a" * 20_000 + b"\r\n--x--\r\n"
    elif content_type.startswith("application/json"):
        body = b'{"content": "' + b"a" * 20_000 + b'"}'
    else:
        body = b"content=" + b"a" * 20_000
    response = _post(api, path, body, content_type)
    assert response.status_code == 413, response.content
    assert response.json() == {"detail": "The request body is larger than the limit of 10000 bytes."}


@pytest.mark.django_db
@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_deeply_nested_json_is_a_400(api, path):
    depth = 100_000  # 200 kB, under the body limit, far past Python's recursion limit
    for body in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        response = _post(api, path, body)
        assert response.status_code == 400, response.content
        assert response.json() == {"detail": "JSON parse error - nested too deeply."}


@pytest.mark.django_db
@pytest.mark.parametrize("path", JSON_ENDPOINTS)
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"content": "caf\xe9"}', "JSON parse error - 'utf-8' codec can't decode byte 0xe9"),
        (b'{"content": "\xff\xfe\xfd"}', "JSON parse error - 'utf-8' codec can't decode byte 0xff"),
        (b'{"content": "\\ud800 alone"}', "JSON parse error - a \\u escape is an unpaired surrogate"),
        (b'{"content": "x", "name": "\\udfff"}', "JSON parse error - a \\u escape is an unpaired surrogate"),
    ],
)
def test_json_that_is_not_unicode_text_is_a_400(api, path, body, message):
    response = _post(api, path, body)
    assert response.status_code == 400, response.content
    assert response.json()["detail"].startswith(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_a_note_of_100_kb_of_blank_lines_is_answered_promptly_by_the_server(user):
    """Notes of NOTE_MAX_CONTENT_BYTES (100 KB) of blank lines. Before the fix, gunicorn gave no
    answer within 30 s to 60,000 newlines (Tier-1's regular expressions were quadratic). The
    server runs in its own process: a regular expression holds the GIL, so an in-process server
    would freeze the test's own client too."""
    token = f"Token {Token.objects.create(user=user).key}"
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}", "--threads", "2"],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url(), "ALLOWED_HOSTS": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its worker is killed with it, even when stuck in a request
    )

    def post(content: str, timeout: float) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/notes/",
            data=json.dumps({"content": content}).encode(),
            headers={"Authorization": token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())

    try:
        for attempt in range(300):  # the server's start-up, on a small note
            try:
                post("ready?", timeout=10)
                break
            except OSError:
                assert server.poll() is None and attempt < 299, "gunicorn did not start"
                sleep(0.1)
        for content in ("a" + "\n" * 99_990 + "x", "\n \t" * 33_000 + "- [ ] at last"):
            status, body = post(content, timeout=20)
            assert status == 201
            assert body["word_count"] == 2 or body["note_type"] == "task"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.mark.django_db
def test_a_surrogate_pair_is_one_character_and_fine(api):
    response = _post(api, "/api/notes/", b'{"content": "clef \\ud834\\udd1e"}')
    assert response.status_code == 201, response.content
    assert response.json()["content"] == "clef \U0001d11e"


@pytest.mark.django_db
def test_nul_characters_in_text_fields_are_a_400(api, user):
    recipient = make_recipient(user)
    cases = [
        ("/api/notes/", {"content": "a\u0000b"}, "content"),
        ("/api/recipients/", {"name": "R\u0000", "email": "r@example.com"}, "name"),
        ("/api/notifications/send-email/", {"recipient_id": recipient.id, "subject": "s", "body": "\u0000"}, "body"),
    ]
    for path, body, field in cases:
        response = api.post(path, body, format="json")
        assert response.status_code == 400, response.content
        assert field in response.json()
    response = api.get("/api/notes/", {"search": "a\u0000b"})
    assert response.status_code == 400
    assert response.json() == {"detail": "Null characters are not allowed."}


@pytest.mark.django_db
def test_the_dashboards_json_actions_refuse_deep_nesting_with_a_400(client):
    client.force_login(make_user("root", is_staff=True, is_superuser=True))
    body = b"[" * 100_000 + b"]" * 100_000
    response = client.post("/admin/jobs/dashboard/pause/", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"detail": "The body is not valid JSON."}


@pytest.mark.django_db
def test_a_url_that_matches_no_route_under_api_is_a_json_404(api):
    for path in ("/api/notes/1.5/", "/api/notes/%FF/", "/api/nothing-here/"):
        response = api.get(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "Not found."}


@pytest.mark.django_db
def test_an_overlong_time_zone_is_a_400_not_a_file_lookup(api):
    response = api.post("/api/recipients/", {"name": "R", "email": "r@example.com", "timezone": "x" * 300})
    assert response.status_code == 400
    assert response.json() == {"timezone": ["Ensure this field has no more than 64 characters."]}


# --- Imports ----------------------------------------------------------------------------------


def _upload(api, data: bytes, name: str):
    upload = SimpleUploadedFile(name, data, content_type="application/octet-stream")
    return api.post("/api/notes/import/", {"file": upload}, format="multipart")


@pytest.mark.django_db
def test_an_import_whose_csv_header_is_not_utf8_is_a_400(api):
    response = _upload(api, b"c\xf6ntent\nrow\n", "notes.csv")
    assert response.status_code == 400
    assert "file" in response.json()
    assert not NoteImport.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_invalid_utf8_rows_are_skipped_with_a_reason_and_the_rest_imports():
    owner = make_user("ursula")
    api = client_for(owner)
    csv_file = b"title,content\nok,fine\nbad,caf\xe9\n\xff\xfe,title bytes\nlast,also fine\n"
    jsonl_file = (
        b'{"content": "fine"}\n{"content": "caf\xe9"}\n\xff\xfe\xfd\n{"content": "\\ud800"}\n{"content": "ok"}\n'
    )
    csv_id = _upload(api, csv_file, "notes.csv").json()["import_id"]
    jsonl_id = _upload(api, jsonl_file, "notes.jsonl").json()["import_id"]

    run_worker(queues=["imports"])

    csv_import, jsonl_import = NoteImport.objects.get(id=csv_id), NoteImport.objects.get(id=jsonl_id)
    assert (csv_import.status, csv_import.imported, csv_import.skipped) == ("done", 2, 2)
    assert csv_import.errors == [
        {"line": 3, "reason": "content is not valid UTF-8"},
        {"line": 4, "reason": "title is not valid UTF-8"},
    ]
    assert (jsonl_import.status, jsonl_import.imported, jsonl_import.skipped) == ("done", 2, 3)
    assert [e["line"] for e in jsonl_import.errors] == [2, 3, 4]
    assert all(e["reason"] for e in jsonl_import.errors)
    assert sorted(Note.objects.filter(owner=owner).values_list("content", flat=True)) == [
        "also fine",
        "fine",
        "fine",
        "ok",
    ]


def test_a_huge_csv_line_is_skipped_with_a_reason_in_bounded_memory(settings):
    settings.NOTE_MAX_CONTENT_BYTES = 10_000
    huge = 20 * 1024 * 1024  # one 20 MiB line, no newline in it
    data = io.BytesIO(b"title,content\nbefore,ok\nbig," + b"x" * huge + b"\nafter,ok\n")
    tracemalloc.start()
    try:
        with import_formats.open_text(data) as text:
            rows = [import_formats.row_validate(record) for record in import_formats.read_records(text, "csv")]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [row.content for row in rows if not isinstance(row, str)] == ["ok", "ok"]
    reasons = [row for row in rows if isinstance(row, str)]
    assert reasons and all("longer than" in reason for reason in reasons), reasons
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes for a {huge}-byte line"


FORMULAS = ["=1+2", '=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\t=1"]


@pytest.mark.django_db(transaction=True)
def test_formula_like_values_are_imported_verbatim_as_text():
    owner = make_user("fiona")
    api = client_for(owner)
    lines = ["title,content,tags"] + [
        f'"{f.replace(chr(34), chr(34) * 2)}","{f.replace(chr(34), chr(34) * 2)} body",' for f in FORMULAS
    ]
    note_import_id = _upload(api, ("\n".join(lines) + "\n").encode(), "notes.csv").json()["import_id"]

    run_worker(queues=["imports"])

    assert NoteImport.objects.get(id=note_import_id).imported == len(FORMULAS)
    stored = dict(Note.objects.filter(owner=owner).values_list("title", "content"))
    assert stored == {f: f"{f} body" for f in FORMULAS}  # not evaluated, not prefixed, not stripped
    listed = {n["title"]: n["content"] for n in api.get("/api/notes/").json()["results"]}
    assert listed == stored


# --- HTML in notes ----------------------------------------------------------------------------


def _only_plain_text(message) -> str:
    assert not message.is_multipart(), "an e-mail with parts (HTML?)"
    assert message.get_content_type() == "text/plain"
    assert not any(part.get_content_type() == "text/html" for part in message.walk())
    return message.get_content()


@pytest.mark.django_db(transaction=True)
def test_html_in_a_notification_goes_out_as_plain_text(smtp):
    owner = make_user("hal")
    notification_services.notification_send_email(
        owner=owner,
        recipient=make_recipient(owner),
        subject=f"Note {SCRIPT}",
        body=f"Look: {SCRIPT}",
        notification_type="note_shared",
        priority="normal",
    )
    run_worker(queues=["notifications"])
    [message] = smtp.messages
    assert SCRIPT in _only_plain_text(message)  # text, shown as typed: no HTML part to run it


@pytest.mark.django_db(transaction=True)
def test_html_in_a_note_reaches_the_digest_email_as_plain_text(smtp):
    owner = make_user("dora")
    recipient = make_recipient(owner)
    now = datetime.now(UTC)
    digest_services.recipient_digest_schedule_create(
        owner=owner,
        now=now - timedelta(days=2),
        recipient=recipient,
        frequency="daily",
        delivery_time=time(0, 0),
        timezone="UTC",
    )
    note_services.note_create(owner=owner, title=SCRIPT, content=f"Body {SCRIPT} #tag")
    assert digest_services.digest_sweep(now=now + timedelta(days=1)) == 1
    run_worker(queues=["notifications"])
    [message] = smtp.messages
    assert SCRIPT in _only_plain_text(message)


@pytest.mark.django_db
def test_html_in_a_note_is_escaped_in_the_admin(client, user):
    note = note_services.note_create(owner=user, title=SCRIPT, content=f"Body {SCRIPT}")
    client.force_login(make_user("root", is_staff=True, is_superuser=True))
    for url in ("/admin/notes/note/", f"/admin/notes/note/{note.id}/change/", "/admin/notes/note/?q=script"):
        page = client.get(url).content.decode()
        assert "<script>alert" not in page, url
        assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in page, url
