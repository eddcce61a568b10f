"""No secrets or personal data in job arguments, job rows or logs.

A full flow through the API and a real worker process: notes enriched by Claude (one answer is
an error that quotes the request back, as providers' errors may), e-mails through the SMTP
peer (one refused with the address in the reply), a digest of the notes, a weekly AI digest
and a CSV import. Then the job tables and every log line (the web side's, captured, and the
worker process's output) are searched for the API key, the recipients' addresses and names,
and the notes' text. Users see their own data in their own rows (notes, notifications,
delivery logs); jobs and logs are read by operators and shipped elsewhere.
"""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime, time, timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from digests import services as digest_services
from digests.models import WeeklyDigest
from notes.models import Note, NoteImport
from notifications.models import NotificationJob
from tests.factories import make_user
from tests.helpers import client_for, smtp_env, start_worker_process, wait_for

API_KEY = "sk-ant-api03-SECRETKEY-do-not-log-0123456789abcdef"
RITA = "rita.private@example.org"
BOUNCE = "bounce.private@example.org"
RITA_NAME = "Rita Quillfeather"
NOTE_TEXT = "Quokka merger plan: acquire Zebracorp before March"
NOTE_TITLE = "Ultraviolet secret title"
SECOND_NOTE = "Dentist appointment Thursday, bring the Xylophone form"
IMPORTED = "Imported diary line about Marmalade Street"
EMAIL_BODY = "Hi Rita, the Pangolin report is attached"

SECRETS = [API_KEY, RITA, BOUNCE, RITA_NAME, NOTE_TEXT, NOTE_TITLE, SECOND_NOTE, IMPORTED, EMAIL_BODY]


def _job_rows() -> dict[str, list[str]]:
    """Everything an operator sees of the jobs, as text."""
    queries = {
        "procrastinate_jobs": "SELECT task_name, args::text, lock, queueing_lock FROM procrastinate_jobs",
        "procrastinate_events": "SELECT ev::text FROM procrastinate_events AS ev",
        "jobs_job_info": "SELECT error, result::text, progress::text, dedup_key, callback_url FROM jobs_job_info",
    }
    rows = {}
    with connection.cursor() as cursor:
        for table, sql in queries.items():
            cursor.execute(sql)
            rows[table] = [" | ".join(str(value) for value in row) for row in cursor.fetchall()]
    return rows


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret.lower() in text.lower()]


@pytest.mark.django_db(transaction=True)
def test_a_full_flow_leaves_no_secret_or_personal_data_in_jobs_or_logs(claude, smtp, settings, caplog):
    caplog.set_level(logging.INFO)
    settings.ANTHROPIC_API_KEY = API_KEY
    owner = make_user("pia")
    api = client_for(owner)

    # Claude: the first call fails permanently, its error quoting the request (the note).
    claude.fail(400, echo=True)
    # SMTP: the first message to arrive is refused, the reply naming the address, as servers do.
    smtp.reply_to_data(f"550 5.1.1 <{BOUNCE}>: Recipient address rejected: user unknown")

    rita = api.post("/api/recipients/", {"name": RITA_NAME, "email": RITA}, format="json").json()
    bounce = api.post("/api/recipients/", {"name": "Bounce", "email": BOUNCE}, format="json").json()
    first = api.post("/api/notes/", {"title": NOTE_TITLE, "content": NOTE_TEXT}, format="json").json()
    api.post("/api/notes/", {"content": SECOND_NOTE}, format="json")
    for recipient, priority in ((bounce, "urgent"), (rita, "low")):
        response = api.post(
            "/api/notifications/send-email/",
            {
                "recipient_id": recipient["id"],
                "subject": f"About {NOTE_TITLE}",
                "body": EMAIL_BODY,
                "priority": priority,
            },
            format="json",
        )
        assert response.status_code == 202, response.content
    upload = SimpleUploadedFile("diary.csv", f"title,content\nDiary,{IMPORTED}\n".encode(), content_type="text/csv")
    note_import = api.post("/api/notes/import/", {"file": upload}, format="multipart").json()

    env = smtp_env(
        smtp,
        ANTHROPIC_API_KEY=API_KEY,
        ANTHROPIC_BASE_URL=claude.base_url,
        LOG_LEVEL="INFO",
        PROCRASTINATE_LOG_LEVEL="INFO",
    )
    worker = start_worker_process("--queues", "enrichment,notifications,imports,digests", env=env)
    output = ""
    try:
        wait_for(lambda: NoteImport.objects.get(id=note_import["import_id"]).status == "done", what="the import")
        # The imported note is enriched too: three notes in all, one of them failed.
        wait_for(
            lambda: Note.objects.filter(enrichment_status__in=["done", "failed"]).count() == 3,
            timeout=30,
            what="enrichment",
        )
        wait_for(
            lambda: set(NotificationJob.objects.values_list("status", flat=True)) == {"sent", "failed"},
            timeout=30,
            what="both e-mails",
        )

        # A digest of the notes to Rita, and the weekly AI digest.
        now = datetime.now(UTC)
        digest_services.recipient_digest_schedule_create(
            owner=owner,
            now=now - timedelta(days=2),
            recipient_id=rita["id"],
            frequency="daily",
            delivery_time=time(0, 0),
            timezone="UTC",
        )
        assert digest_services.digest_sweep(now=now + timedelta(days=1)) == 1
        assert digest_services.weekly_digest_fanout(period_end=now) == 1
        wait_for(lambda: len(smtp.messages) == 2, timeout=30, what="the digest e-mail")
        wait_for(lambda: WeeklyDigest.objects.filter(owner=owner).exists(), timeout=30, what="the weekly digest")
    finally:
        worker.send_signal(signal.SIGTERM)
        output = worker.communicate(timeout=30)[0]

    # The flow happened, with its failures, and the data went where it belongs.
    assert Note.objects.get(id=first["id"]).enrichment_status in ("done", "failed")
    assert Note.objects.filter(enrichment_status="failed").count() == 1
    assert sorted(NotificationJob.objects.values_list("status", flat=True)) == ["failed", "sent", "sent"]
    assert any(NOTE_TEXT in m.get_content() or SECOND_NOTE in m.get_content() for m in smtp.messages)
    assert all(API_KEY in str(r["headers"]) for r in claude.message_requests)  # the worker had the key
    assert any(NOTE_TEXT in str(r["body"]) for r in claude.message_requests)
    assert "ended with status" in output  # the worker logged its jobs

    rows = _job_rows()
    assert rows["jobs_job_info"] and any("Error" in row for row in rows["jobs_job_info"])  # errors stored
    found = {
        **{table: _leaks("\n".join(text)) for table, text in rows.items()},
        "web logs": _leaks(caplog.text),
        "worker output": _leaks(output),
    }
    # The refusal is in the job as its code only; the server's words (naming the address) stay in
    # the notification's own delivery log.
    assert any("SMTP 5" in row and "(permanent)" in row for row in rows["jobs_job_info"])
    assert not any(found.values()), f"leaked: {found}\n--- worker output ---\n{output}\n--- rows ---\n{rows}"
