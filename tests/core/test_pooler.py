"""The web through a real PgBouncer in transaction mode, a worker on the direct URL.

The production server command (gunicorn + uvicorn workers, as the Dockerfile starts it) runs with
DATABASE_URL at PgBouncer and DATABASE_DIRECT_URL at PostgreSQL; a `manage.py procrastinate
worker` process gets the same two URLs. The API's core flows go through them: notes and their
enrichment, an e-mail, an import, idempotency keys, throttling, the jobs API, a job stream.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.authtoken.models import Token

from jobs.tasking.defer import job_defer
from notes.models import Note
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import BASE_DIR, database_url, start_worker_process, wait_for
from tests.jobs.tasks_for_tests import later
from tests.peers.claude import FakeClaude
from tests.peers.smtp import SmtpSink
from tests.production_server import Server, Stream

pytestmark = pytest.mark.django_db(transaction=True)


def _settings_of(env: dict[str, str], expression: str):
    script = f"import django, json; django.setup(); from django.conf import settings; print(json.dumps({expression}))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_without_a_direct_url_there_is_no_pooler_and_sessions_keep_their_settings():
    url = "postgres://postgres@127.0.0.1:5432/secondbrain"
    for env in ({"DATABASE_URL": url}, {"DATABASE_URL": url, "DATABASE_DIRECT_URL": url}):
        pooled, direct, options = _settings_of(
            env,
            "[settings.DATABASE_BEHIND_POOLER, settings.DATABASE_DIRECT,"
            " settings.DATABASES['default']['OPTIONS']['options']]",
        )
        assert (pooled, direct) == (False, None)
        assert "client_connection_check_interval" in options
    # Statements are prepared on every connection (the web's, a worker's).
    binding, threshold = _settings_of(
        {"DATABASE_URL": url},
        "[settings.DATABASES['default']['OPTIONS'][key] for key in ('server_side_binding', 'prepare_threshold')]",
    )
    assert (binding, threshold) == (True, 5)


def test_behind_a_pooler_the_web_sends_no_startup_options_and_the_direct_url_keeps_them():
    env = {
        "DATABASE_URL": "postgres://app@127.0.0.1:6432/secondbrain",
        "DATABASE_DIRECT_URL": "postgres://worker:pw@10.0.0.5:5432/secondbrain?sslmode=require",
    }
    pooled, default, direct = _settings_of(
        env, "[settings.DATABASE_BEHIND_POOLER, settings.DATABASES['default'], settings.DATABASE_DIRECT]"
    )
    assert pooled is True
    assert "options" not in default["OPTIONS"]
    assert default["PORT"] == 6432
    assert (direct["HOST"], direct["PORT"], direct["USER"], direct["PASSWORD"]) == ("10.0.0.5", 5432, "worker", "pw")
    assert direct["OPTIONS"]["sslmode"] == "require"
    assert "client_connection_check_interval=500" in direct["OPTIONS"]["options"]
    assert direct["OPTIONS"]["keepalives"] == 1
    # Prepared statements only on the direct sessions: PgBouncer before 1.21 cannot keep them.
    assert default["OPTIONS"]["prepare_threshold"] is None
    assert direct["OPTIONS"]["prepare_threshold"] == 5


def test_a_direct_url_that_is_not_postgresql_stops_the_start():
    env = {
        "DATABASE_URL": "postgres://app@127.0.0.1:6432/x",
        "DATABASE_DIRECT_URL": "sqlite:///x.sqlite3",
        "DEBUG": "true",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=BASE_DIR, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert result.returncode != 0 and "DATABASE_DIRECT_URL" in result.stderr


def _post(server: Server, path: str, token: str, body: bytes, content_type: str, **headers: str) -> tuple[int, dict]:
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    try:
        client.request(
            "POST",
            path,
            body=body,
            headers={"Authorization": f"Token {token}", "Content-Type": content_type, **headers},
        )
        response = client.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        client.close()


def _upload(server: Server, path: str, token: str, data: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="notes.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return _post(server, path, token, body, f"multipart/form-data; boundary={boundary}")


def test_a_worker_behind_a_pooler_checks_the_direct_url_at_start():
    """The pooler answers, PostgreSQL's own address does not: the worker stops, naming it."""
    env = {
        "DATABASE_URL": database_url(),
        "DATABASE_DIRECT_URL": "postgres://postgres@127.0.0.1:1/secondbrain",
        "DATABASE_CONNECT_TIMEOUT": "2",
        "DEBUG": "true",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "procrastinate", "worker"],
        cwd=BASE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot reach the database at 127.0.0.1:1/secondbrain" in result.stderr
    assert "check DATABASE_DIRECT_URL" in result.stderr


@pytest.fixture
def peers():
    claude, smtp = FakeClaude().start(), SmtpSink().start()
    yield claude, smtp
    claude.stop()
    smtp.stop()


def test_the_api_core_flows_through_pgbouncer_in_transaction_mode(pgbouncer, peers, tmp_path):
    claude, smtp = peers
    direct = database_url()
    urls = {"DATABASE_URL": pgbouncer.url(), "DATABASE_DIRECT_URL": direct}
    provider_env = {
        "ANTHROPIC_API_KEY": "sk-ant-test-key",
        "ANTHROPIC_BASE_URL": claude.base_url,
        "EMAIL_URL": f"smtp://127.0.0.1:{smtp.port}",
        "NOTIFICATIONS_RATE_PER_SECOND": "1000",
    }
    server = Server(tmp_path, env={**urls, **provider_env, "THROTTLE_USER_RATE": "40/min"})
    # The worker keeps its Django connection (the tasks' queries), so that PgBouncer would list it.
    worker_env = {**urls, **provider_env, "DATABASE_CONN_MAX_AGE": "600"}
    worker = start_worker_process("--queues", "enrichment,notifications,imports", env=worker_env)
    try:
        owner = make_user("pia")
        token = Token.objects.create(user=owner).key
        # A note, enriched by the worker.
        status, note = server.request("POST", "/api/notes/", token=token, body={"content": "PgBouncer pools #db"})
        assert status == 201, note
        wait_for(lambda: Note.objects.get(id=note["id"]).enrichment_status == "done", timeout=60, what="enrichment")
        status, listed = server.request("GET", "/api/notes/", token=token)
        assert status == 200 and listed["results"][0]["id"] == note["id"]
        # An e-mail through the SMTP sink.
        rita = make_recipient(owner)
        email = {"recipient_id": rita.id, "subject": "Hi", "body": "Pooled", "notification_type": "system"}
        status, sent = server.request("POST", "/api/notifications/send-email/", token=token, body=email)
        assert status in (201, 202), sent
        wait_for(lambda: len(smtp.messages) == 1, timeout=60, what="the e-mail")
        wait_for(lambda: NotificationJob.objects.get().status == "sent", timeout=30, what="sent")
        # The health check (a worker's heartbeat read through the pooler).
        wait_for(lambda: server.request("GET", "/api/health/")[0] == 200, timeout=30, what="a healthy answer")
        # Idempotency keys: the same key twice, one note.
        key = str(uuid.uuid4())
        once = json.dumps({"content": "once"}).encode()
        answers = [
            _post(server, "/api/notes/", token, once, "application/json", **{"Idempotency-Key": key}) for _ in range(2)
        ]
        assert answers[0] == answers[1] and answers[0][0] == 201
        assert Note.objects.filter(owner=owner, content="once").count() == 1
        # The jobs API and a job stream (the stream hub on the direct URL: LISTEN, advisory locks).
        status, page = server.request("GET", "/api/jobs/", token=token)
        assert status == 200, page
        job_id = page["results"][0]["id"]
        status, detail = server.request("GET", f"/api/jobs/{job_id}/", token=token)
        assert status == 200 and detail["id"] == job_id
        # A stream stays open on a job that is still to run (one scheduled for next year).
        later_id = job_defer(later, owner_id=owner.id, schedule_at=timezone.now() + timedelta(days=365))
        stream = Stream(server, later_id, token)
        assert stream.started() == 200
        # The stream's slot is a session advisory lock: held on a direct session, not PgBouncer's.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND a.pid <> pg_backend_pid()"
            )
            holders = {port for (port,) in cursor.fetchall()}
        assert holders and not holders & pgbouncer.server_ports()
        stream.sock.close()
        # An import: a request, then the `notes.import` job and its notes' enrichment.
        status, imported = _upload(server, "/api/notes/import/", token, b"title,content,tags\na,first,\nb,second,\n")
        assert status == 202, imported
        wait_for(lambda: Note.objects.filter(owner=owner).count() == 4, timeout=60, what="the import")
        # Throttling: the count lives in PostgreSQL, through the pooler too.
        statuses = [server.request("GET", "/api/notes/", token=token)[0] for _ in range(45)]
        assert 429 in statuses and statuses[0] == 200
        assert pgbouncer.clients(), "the web's connections go through PgBouncer"
        log = server.log.read_text()
        assert "Traceback" not in log and '" 500' not in log, log[-3000:]
        # The web gone, the worker still at work: none of its connections is PgBouncer's.
        server.stop()
        wait_for(lambda: not pgbouncer.clients(), timeout=30, what="no client left on PgBouncer")
        assert worker.poll() is None
    finally:
        server.stop()
        worker.terminate()
        output = worker.communicate(timeout=60)[0]
    assert "prepared statement" not in output, output[-3000:]
