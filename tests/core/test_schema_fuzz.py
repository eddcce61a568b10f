"""Schemathesis against every operation of /api/schema/, through the WSGI app (no server).

Each operation gets a bounded number of generated requests, valid and invalid, as a signed-in
user (staff for the staff-only operations). Every response must be a documented status with a
body that matches its documented schema, and none may be a 5xx.

Schemathesis's pytest plugin (`schemathesis.pytest.from_fixture`) does not run on this pytest,
so the test drives each operation's Hypothesis strategy itself and reports every failing
operation at once. Random ids and names rarely hit anything, so about half the requests get
the ids of real objects and the real recipient, queue and credentials patched in: those reach
the code behind the 404s and 400s.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from datetime import timedelta

import hypothesis
import pytest
import schemathesis
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, connection
from django.utils import timezone
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from digests.models import WeeklyDigest
from jobs import job_batch, job_defer
from tests.factories import make_recipient, make_user
from tests.jobs import tasks_for_tests

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Requests per operation and generation mode (valid, then invalid): about 30 s in all on two
# cores. FUZZ_EXAMPLES=500 make test ARGS=tests/core/test_schema_fuzz.py digs deeper.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
STAFF_ONLY_PATHS = ("/api/jobs/queues/",)
ERASE_PATH = "/api/auth/erase/"
# An event stream stays open until its job (or batch) ends: tests/jobs/test_stream.py and
# tests/jobs/test_batch_stream.py cover them.
STREAMING_PATHS = ("/api/jobs/{id}/stream/", "/api/jobs/batches/{id}/stream/")
PASSWORD = "correct-horse-battery"
CSV_FILE = b"title,content,tags\nFuzz,A note from a file #fuzz,fuzz\n"


@pytest.fixture
def wsgi_app(db):
    """The project's WSGI app, as served, without closing the test's connection after each
    request (which Django's own test client avoids the same way)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield get_wsgi_application()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def fuzz_world(db, settings, user, api):
    """Real objects of every kind for the path parameters, and tokens for a user and a superuser."""
    settings.ALLOWED_HOSTS = ["localhost", "testserver"]
    settings.ANTHROPIC_API_KEY = ""
    # The token endpoint hashes every password it is sent: keep that cheap.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    user.set_password(PASSWORD)
    user.save()
    with connection.cursor() as cursor:  # a live worker, or /api/health/ is a 503 (as documented)
        cursor.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now())")
    admin = make_user("root", is_staff=True, is_superuser=True)
    recipient = make_recipient(user)
    note = api.post("/api/notes/", {"content": "A note #fuzz"}, format="json").json()
    sent = api.post(
        "/api/notifications/send-email/",
        {"recipient_id": recipient.id, "subject": "Hi", "body": "Hello"},
        format="json",
    ).json()
    schedule = api.post(
        "/api/digest-schedules/",
        {"recipient_id": recipient.id, "frequency": "daily", "delivery_time": "08:00"},
        format="json",
    ).json()
    upload = SimpleUploadedFile("notes.csv", CSV_FILE, content_type="text/csv")
    note_import = api.post("/api/notes/import/", {"file": upload}, format="multipart").json()
    with job_batch(owner_id=user.pk, name="fuzz") as batch:  # a batch of the user's, one member waiting
        job_defer(tasks_for_tests.echo, owner_id=user.pk, value=1)
    now = timezone.now()
    digest = WeeklyDigest.objects.create(owner=user, period_start=now - timedelta(days=7), period_end=now, content="d")
    return {
        "user": Token.objects.get(user=user).key,
        "staff": Token.objects.create(user=admin).key,
        # Erasing an account with the right password works: the fuzzer erases this one, not "user".
        "erasable": Token.objects.create(user=make_user("erasable", password=PASSWORD)).key,
        # Path template prefix -> the values to patch into its path parameter.
        "path_values": {
            "/api/notes/import/{import_id}/": {"import_id": note_import["import_id"]},
            "/api/notes/{id}/": {"id": note["id"]},
            "/api/recipients/{id}/": {"id": recipient.id},
            "/api/digest-schedules/{id}/": {"id": schedule["id"]},
            "/api/digests/{id}/": {"id": digest.id},
            "/api/notifications/jobs/{id}/": {"id": sent["job_id"]},
            "/api/jobs/{id}/": {"id": note_import["job_id"]},
            "/api/jobs/batches/{id}/": {"id": batch.id},
            "/api/jobs/queues/{name}/": {"name": "imports"},
        },
        # Body fields that must name something real for the request to get past validation.
        "body_values": {
            "recipient_id": recipient.id,
            "recipient_ids": [recipient.id],
            "username": user.username,
            "password": PASSWORD,
            "file": CSV_FILE,
            "format": "csv",
        },
        "statuses": {},
    }


def _patch(case, world: dict) -> None:
    for prefix, values in world["path_values"].items():
        if case.operation.path.startswith(prefix):
            case.path_parameters = {**(case.path_parameters or {}), **values}
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    if isinstance(case.body, dict):
        for field, value in world["body_values"].items():
            if field in case.body:
                case.body[field] = value
        case.body.pop("callback_url", None)  # its host would have to be allowed


def _fuzz(operation, mode: GenerationMode, world: dict) -> None:
    staff = operation.path.startswith(STAFF_ONLY_PATHS)
    who = "staff" if staff else "erasable" if operation.path == ERASE_PATH else "user"
    headers = {"Authorization": f"Token {world[who]}"}

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],  # no shrinking: the report names the request
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), patch=st.booleans())
    def run(case, patch):
        if patch:
            _patch(case, world)
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        world["statuses"].setdefault(operation.label, Counter())[response.status_code] += 1

    run()


def test_every_operation_answers_as_documented(fuzz_world, wsgi_app):
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", wsgi_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    failures, started = [], time.monotonic()
    for operation in operations:
        if operation.path in STREAMING_PATHS:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, fuzz_world)
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing to make invalid: no parameters, no body
            except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; all are reported
                failures.append(f"--- {operation.label} ({mode.value})\n{exc}")
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} failing operation runs in {elapsed:.0f} s:\n" + "\n".join(failures)

    # The run reached the code behind the errors: every operation answered something other
    # than 401, and most of them (all but the few whose success needs a state the fuzzer cannot
    # make, such as retrying a failed job) succeeded at least once.
    statuses = fuzz_world["statuses"]
    tested = {op.label for op in operations if op.path not in STREAMING_PATHS}
    assert tested <= set(statuses), f"operations never answered: {tested - set(statuses)}"
    assert not [label for label, counts in statuses.items() if set(counts) == {401}]
    succeeded = {label for label, counts in statuses.items() if any(200 <= code < 300 for code in counts)}
    assert len(succeeded) >= len(tested) - 4, f"never succeeded: {sorted(tested - succeeded)}"
    for label, counts in sorted(statuses.items()):
        print(label, dict(counts))
