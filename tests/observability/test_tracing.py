"""Traces across the job boundary: the request that defers a job, each attempt of the job and its
provider calls form one trace, exported over OTLP/HTTP to a real receiver on 127.0.0.1.

The web side is the test client, the worker a real Procrastinate worker (in this process, or a
worker process configured by the standard OTEL_* variables). Spans are exported by a
BatchSpanProcessor and flushed when the worker stops (jobs/engine/worker.py) and by
`tracing_flush()` before reading: no sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from django.conf import settings as django_settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from core import tracing
from core.errors import ProviderError
from jobs.engine import middleware
from jobs.tasking.defer import job_defer
from notes.models import Note
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import client_for, jobs, run_worker, start_worker_process, stop_worker
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.test_webhooks import receiver, resolver, run_jobs_then_deliveries  # noqa: F401 (fixtures)
from tests.peers.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.django_db(transaction=True)

BASE_DIR = django_settings.BASE_DIR


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """A receiver, and this process's spans exported to it (tracing is off in the test settings)."""
    server = OtlpReceiver().start()
    provider = TracerProvider(resource=Resource.create({"service.name": "secondbrain-test"}))
    exporter = OTLPSpanExporter(endpoint=f"{server.endpoint}/v1/traces", timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    tracing.tracing_install(provider)
    yield server
    tracing.tracing_install(None)
    provider.shutdown()
    server.stop()


def fast_forward_all() -> None:
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo'")


def attempts(otlp: OtlpReceiver, task: str) -> list[ReceivedSpan]:
    return sorted(otlp.named(f"job {task}"), key=lambda span: span.attributes["job.attempt"])


def test_a_note_capture_its_enrichment_and_a_retried_claude_call_form_one_trace(otlp, claude):
    owner = make_user("tara")
    claude.fail(529)  # the first Claude call is overloaded: the job is retried
    response = client_for(owner).post("/api/notes/", {"content": "SKIP LOCKED makes a fine queue"}, format="json")
    assert response.status_code == 201, response.content
    note_id = response.json()["id"]
    [job] = jobs("notes.enrich")
    run_worker()
    fast_forward_all()
    run_worker()
    assert Note.objects.get(id=note_id).enrichment_status == "done"
    tracing.tracing_flush()

    request = otlp.span("POST /api/notes/")
    assert request.kind == "SERVER" and request.parent_span_id == ""
    assert request.attributes["http.response.status_code"] == 201
    first, second = attempts(otlp, "notes.enrich")
    # Each attempt is its own span, a child of the request: siblings in one trace.
    assert first.is_child_of(request) and second.is_child_of(request)
    assert first.span_id != second.span_id
    for attempt, span in enumerate((first, second), start=1):
        assert span.kind == "CONSUMER"
        assert span.attributes["job.id"] == job["id"]
        assert span.attributes["job.queue"] == job["queue_name"]
        assert span.attributes["job.task"] == "notes.enrich"
        assert span.attributes["job.attempt"] == attempt
        assert span.attributes["job.wait_seconds"] >= 0
    assert first.failed and first.attributes["job.outcome"] == "failed" and first.attributes["job.will_retry"]
    assert not second.failed and second.attributes["job.outcome"] == "succeeded"
    calls = otlp.named("claude messages.create")
    assert len(calls) == 2
    failed_call = next(call for call in calls if call.is_child_of(first))
    good_call = next(call for call in calls if call.is_child_of(second))
    assert failed_call.failed and failed_call.kind == "CLIENT"
    assert not good_call.failed and good_call.attributes["gen_ai.usage.output_tokens"] == 50
    assert good_call.attributes["server.address"] == "127.0.0.1"
    # Nothing of the note's text in any span.
    assert not any("SKIP LOCKED" in str(span.attributes) for span in otlp.spans)


def test_an_email_and_its_retried_smtp_delivery_form_one_trace(otlp, smtp):
    owner = make_user("uma")
    rita = make_recipient(owner)
    smtp.reply_to_data("451 4.3.0 <rita@example.com> try again later")
    payload = {
        "recipient_id": rita.id,
        "subject": "Hello",
        "body": "Hi there",
        "notification_type": "system",
        "priority": "normal",
    }
    response = client_for(owner).post("/api/notifications/send-email/", payload, format="json")
    assert response.status_code in (201, 202), response.content
    run_worker()
    fast_forward_all()
    run_worker()
    assert len(smtp.messages) == 1
    assert NotificationJob.objects.get().status == "sent"
    tracing.tracing_flush()

    request = otlp.span("POST /api/notifications/send-email/")
    first, second = attempts(otlp, "notifications.deliver")
    assert first.is_child_of(request) and second.is_child_of(request)
    assert first.failed and not second.failed
    sends = otlp.named("smtp send")
    assert [send.failed for send in sends if send.is_child_of(first)] == [True]
    assert [send.failed for send in sends if send.is_child_of(second)] == [False]
    assert all(send.attributes["server.port"] == smtp.port for send in sends)
    [failed_send] = [send for send in sends if send.failed]
    assert "451" in failed_send.exceptions[0]["exception.message"]
    # The server's reply quoted the address: the provider error keeps it out (its summary).
    assert not any("rita@" in str(span.attributes) + str(span.exceptions) for span in otlp.spans)


def test_jobs_that_a_job_defers_in_bulk_are_its_children(otlp):
    """An import (a request, then the `notes.import` job) defers its notes' enrichment with one
    bulk defer from inside the job: those jobs' spans are children of the import's."""
    owner = make_user("wes")
    data = b"title,content,tags\na,first note,\nb,second note,\n"
    response = client_for(owner).post(
        "/api/notes/import/",
        {"file": SimpleUploadedFile("notes.csv", data, content_type="text/csv")},
        format="multipart",
    )
    assert response.status_code == 202, response.content
    run_worker(queues=["imports"])
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'notes.enrich' AND trace_context ? 'traceparent'"
        )
        assert cursor.fetchone()[0] == 2
    run_worker(queues=["enrichment"])
    tracing.tracing_flush()

    request = otlp.span("POST /api/notes/import/")
    imported = otlp.span("job notes.import")
    enrichments = otlp.named("job notes.enrich")
    assert imported.is_child_of(request)
    assert len(enrichments) == 2 and all(span.is_child_of(imported) for span in enrichments)


def test_a_job_deferred_outside_any_span_starts_its_own_trace(otlp):
    first = job_defer(tasks.echo, value=1)  # as a command would
    tasks.echo.defer(value=2)  # Procrastinate's own insert, as the periodic deferrer's
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM procrastinate_jobs WHERE trace_context IS NULL")
        assert cursor.fetchone()[0] == 2
        # The first has waited an hour since it was deferred (its wait counts from then).
        cursor.execute("UPDATE procrastinate_events SET at = at - interval '1 hour' WHERE job_id = %s", [first])
    run_worker([tasks.QUEUE_A])
    tracing.tracing_flush()

    spans = otlp.named("job tests.echo")
    assert len(spans) == 2
    assert all(span.parent_span_id == "" for span in spans)
    assert spans[0].trace_id != spans[1].trace_id
    waits = {span.attributes["job.id"]: span.attributes["job.wait_seconds"] for span in spans}
    assert waits[first] >= 3600 > max(wait for job_id, wait in waits.items() if job_id != first)


def test_a_job_runs_in_a_trace_of_its_own_when_its_trace_context_cannot_be_read(otlp, monkeypatch):
    monkeypatch.setattr(middleware, "_TRACE_CONTEXT", "SELECT * FROM no_such_table WHERE %(job_id)s > 0")
    with tracing.tracer().start_as_current_span("caller"):
        job_id = job_defer(tasks.echo, value=1)
    run_worker([tasks.QUEUE_A])
    tracing.tracing_flush()

    assert jobs("tests.echo")[0]["status"] == "succeeded"
    span = otlp.span("job tests.echo")
    assert span.parent_span_id == "" and span.attributes["job.id"] == job_id and not span.failed


def test_a_job_deferred_inside_a_job_and_its_webhook_delivery_join_the_trace(otlp, receiver):  # noqa: F811
    owner = make_user("vera")
    with tracing.tracer().start_as_current_span("caller") as caller:
        job_defer(tasks.echo, owner_id=owner.id, callback_url=receiver.url(), value=1)
    run_jobs_then_deliveries()
    tracing.tracing_flush()

    parent = otlp.span("caller")
    assert parent.span_id == format(caller.get_span_context().span_id, "016x")
    job = otlp.span("job tests.echo")
    delivery = otlp.span("job jobs.webhook_deliver")
    post = otlp.span("webhook POST")
    assert job.is_child_of(parent)
    assert delivery.is_child_of(parent)  # queued by the job's end, in the trace of the job
    assert post.is_child_of(delivery) and post.attributes["http.response.status_code"] == 200
    assert len(receiver.posts) == 1


def test_a_worker_process_exports_to_the_endpoint_the_standard_variable_names(otlp):
    """OTEL_EXPORTER_OTLP_ENDPOINT alone turns tracing on in a worker process."""
    with tracing.tracer().start_as_current_span("caller"):
        job_defer(tasks.echo, value=1)
    env = {
        **tasks.WORKER_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_SERVICE_NAME": "secondbrain-worker",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    worker = start_worker_process("--queues", tasks.QUEUE_A, env=env)
    try:
        span = otlp.wait_for_span("job tests.echo")
    finally:
        output = stop_worker(worker)
    tracing.tracing_flush()
    assert span.service == "secondbrain-worker", output
    assert span.is_child_of(otlp.span("caller"))


def test_a_request_continues_the_trace_its_caller_sent(otlp):
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = client_for(make_user("xena")).get("/api/health/", HTTP_TRACEPARENT=f"00-{trace_id}-{caller_span}-01")
    tracing.tracing_flush()

    request = otlp.span("GET /api/health/")
    assert request.trace_id == trace_id and request.parent_span_id == caller_span
    # Health answers 503 here (no live worker): the status is on the span, and a 5xx marks it.
    assert request.attributes["http.response.status_code"] == response.status_code
    assert request.failed == (response.status_code >= 500)


def test_a_failed_provider_call_records_its_error_redacted(otlp):
    with pytest.raises(ProviderError), tracing.provider_span("smtp send"):
        raise ProviderError("550 <bob@example.com> no such user, key sk-ant-api03-abcdefghijklmnop", permanent=True)
    tracing.tracing_flush()

    span = otlp.span("smtp send")
    assert span.failed and span.kind == "CLIENT"
    [exception] = span.exceptions
    assert exception["exception.type"].endswith("ProviderError") and "550" in exception["exception.message"]
    recorded = str(exception)
    assert "bob@example.com" not in recorded and "abcdefghijklmnop" not in recorded, recorded


def test_tracing_is_off_without_configuration_and_loads_no_sdk():
    code = (
        "import sys, django; django.setup();"
        "from django.conf import settings; from core import tracing;"
        "from jobs.tasking.defer import _job_params; from tests.jobs import tasks_for_tests as t;"
        "params = _job_params(t.echo.configure().make_new_job(value=1));"
        "print(settings.TRACING_ENABLED, tracing.tracer(), params['trace_context'],"
        " 'opentelemetry.sdk' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACING_"))}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=BASE_DIR,
        env={**env, "DJANGO_SETTINGS_MODULE": "config.settings"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["False", "None", "None", "False"], result.stderr
