from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import CircuitBreaker, PausedQueue
from jobs.tasking.breaker import breaker_record_failure
from llm.models import LlmUsage
from notifications.models import DeliveryLog, NotificationJob
from notifications.services import EMAIL_BREAKER
from observability.metrics import SCRAPES, SecondbrainCollector
from tests.factories import make_recipient, make_user
from tests.helpers import at_once
from tests.jobs.test_dashboard import make_job

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _public_uncached_metrics(settings) -> None:
    """These tests read the numbers: no token, and every scrape collects afresh."""
    settings.METRICS_PUBLIC = True
    settings.METRICS_CACHE_SECONDS = 0
    SCRAPES.clear()  # no collection of an earlier test is served


def scrape(client, **headers) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, metric: str, **labels) -> float:
    return samples[(metric, frozenset(labels.items()))]


def test_job_counts_paused_queues_and_live_workers(client):
    make_job("imports.run", "imports")
    make_job("imports.run", "imports")
    make_job("notifications.deliver", "notifications", "failed")
    PausedQueue.objects.create(queue_name="imports")
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now()), (now() - interval '1 day')")

    samples = scrape(client)

    assert value(samples, "secondbrain_jobs", queue="imports", status="todo") == 2
    assert value(samples, "secondbrain_jobs", queue="notifications", status="failed") == 1
    assert value(samples, "secondbrain_jobs", queue="maintenance", status="todo") == 0
    assert value(samples, "secondbrain_queue_paused", queue="imports") == 1
    assert value(samples, "secondbrain_queue_paused", queue="digests") == 0
    assert value(samples, "secondbrain_workers_live") == 1


def test_job_duration_histogram_and_attempts_per_task(client):
    for ran in (0.3, 2.0, 20.0):
        make_job("digests.weekly", "digests", "succeeded", waited=1, ran=ran)
    failed = make_job("digests.weekly", "digests", "failed", waited=1, ran=0.05)
    make_job("digests.weekly", "digests")  # never ran: not in the histogram
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET attempts = 3 WHERE id = %s", [failed])

    samples = scrape(client)

    bucket = "secondbrain_job_duration_seconds_bucket"
    assert value(samples, bucket, task="digests.weekly", le="0.05") == 1
    assert value(samples, bucket, task="digests.weekly", le="0.5") == 2
    assert value(samples, bucket, task="digests.weekly", le="2.5") == 3
    assert value(samples, bucket, task="digests.weekly", le="10.0") == 3
    assert value(samples, bucket, task="digests.weekly", le="30.0") == 4
    assert value(samples, bucket, task="digests.weekly", le="+Inf") == 4
    assert value(samples, "secondbrain_job_duration_seconds_count", task="digests.weekly") == 4
    assert value(samples, "secondbrain_job_duration_seconds_sum", task="digests.weekly") == pytest.approx(22.35)
    assert value(samples, "secondbrain_job_attempts_count", task="digests.weekly") == 5
    assert value(samples, "secondbrain_job_attempts_sum", task="digests.weekly") == 3


def test_runs_that_ended_over_a_day_ago_leave_the_histogram(client):
    make_job("digests.weekly", "digests", "succeeded", ran=1, ended_ago=2 * 24 * 3600)
    make_job("digests.weekly", "digests", "succeeded", ran=1)
    samples = scrape(client)
    assert value(samples, "secondbrain_job_duration_seconds_count", task="digests.weekly") == 1


def test_emails_by_outcome_and_notifications_by_status(client):
    owner = make_user("mailer")
    recipient = make_recipient(owner)
    sent = NotificationJob.objects.create(owner=owner, recipient=recipient, status="sent")
    failed = NotificationJob.objects.create(owner=owner, recipient=recipient, status="failed")
    NotificationJob.objects.create(owner=owner, recipient=recipient, status="pending")
    Outcome = DeliveryLog.Outcome
    for notification, attempt, outcome in (
        (sent, 1, Outcome.TRANSIENT_FAILURE),
        (sent, 2, Outcome.SENT),
        (failed, 1, Outcome.TRANSIENT_FAILURE),
        (failed, 2, Outcome.PERMANENT_FAILURE),
    ):
        DeliveryLog.objects.create(notification=notification, attempt=attempt, outcome=outcome)

    samples = scrape(client)

    assert value(samples, "secondbrain_email_deliveries_total", outcome="sent") == 1
    assert value(samples, "secondbrain_email_deliveries_total", outcome="transient_failure") == 2
    assert value(samples, "secondbrain_email_deliveries_total", outcome="permanent_failure") == 1
    assert value(samples, "secondbrain_email_deliveries_total", outcome="postponed") == 0
    assert value(samples, "secondbrain_notifications", status="pending") == 1
    assert value(samples, "secondbrain_notifications", status="processing") == 0
    # Finished notifications are counted by delivery outcome, not as a gauge of rows retention deletes.
    assert ("secondbrain_notifications", frozenset({("status", "sent")})) not in samples


def test_llm_tokens_and_spend(client):
    for tokens_in, tokens_out, cost in ((100, 20, "0.010000"), (50, 10, "0.020500")):
        LlmUsage.objects.create(
            purpose="note_enrichment",
            model="claude-haiku-4-5",
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=Decimal(cost),
        )
    LlmUsage.objects.create(
        purpose="weekly_digest", model="claude-haiku-4-5", input_tokens=7, output_tokens=3, cost_usd=0
    )

    samples = scrape(client)

    labels = {"purpose": "note_enrichment", "model": "claude-haiku-4-5"}
    assert value(samples, "secondbrain_llm_calls_total", **labels) == 2
    assert value(samples, "secondbrain_llm_tokens_total", direction="input", **labels) == 150
    assert value(samples, "secondbrain_llm_tokens_total", direction="output", **labels) == 30
    assert value(samples, "secondbrain_llm_spend_usd_total", **labels) == pytest.approx(0.0305)
    assert value(samples, "secondbrain_llm_calls_total", purpose="weekly_digest", model="claude-haiku-4-5") == 1


def test_circuit_breaker_states(client):
    assert value(scrape(client), "secondbrain_circuit_breaker_state", name=EMAIL_BREAKER) == 0  # no row yet
    breaker_record_failure(name=EMAIL_BREAKER, threshold=1, cooldown_seconds=30)
    CircuitBreaker.objects.create(name="claude", state=CircuitBreaker.State.HALF_OPEN)
    samples = scrape(client)
    assert value(samples, "secondbrain_circuit_breaker_state", name=EMAIL_BREAKER) == 2
    assert value(samples, "secondbrain_circuit_breaker_state", name="claude") == 1


def test_the_token_is_required_when_set(client, settings):
    settings.METRICS_TOKEN = "s3cret-scrape-token"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Token s3cret-scrape-token").status_code == 401
    response = client.get("/metrics")
    assert response["WWW-Authenticate"].startswith("Bearer")
    samples = scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-scrape-token")
    assert value(samples, "secondbrain_workers_live") == 0


def test_only_get_and_head(client):
    assert client.head("/metrics").status_code == 200
    assert client.post("/metrics").status_code == 405


def test_without_a_token_metrics_are_refused_unless_debug_or_public(client, settings):
    settings.DEBUG = False
    settings.METRICS_TOKEN = ""
    settings.METRICS_PUBLIC = False
    response = client.get("/metrics")
    assert response.status_code == 403
    assert b"METRICS_TOKEN" in response.content
    settings.METRICS_PUBLIC = True
    assert client.get("/metrics").status_code == 200
    settings.METRICS_PUBLIC = False
    settings.DEBUG = True
    assert client.get("/metrics").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_fifty_parallel_scrapes_collect_once(settings):
    settings.METRICS_CACHE_SECONDS = 30
    owner = make_user("scraped")
    notification = NotificationJob.objects.create(owner=owner, recipient=make_recipient(owner), status="sent")
    DeliveryLog.objects.bulk_create(
        [DeliveryLog(notification=notification, attempt=i, outcome="sent") for i in range(1, 1001)]
    )
    with CaptureQueriesContext(connection) as one_collection:
        collected = SecondbrainCollector()
        assert list(collected.collect())
    lock = threading.Lock()
    queries: list[str] = []

    def count(execute, sql, params, many, context):
        with lock:
            queries.append(sql)
        return execute(sql, params, many, context)

    def scrape_once() -> bytes:
        with connection.execute_wrapper(count):
            response = Client().get("/metrics")
        assert response.status_code == 200
        return response.content

    bodies = at_once(50, scrape_once, timeout=120)

    assert len(bodies) == 50 and len(set(bodies)) == 1
    assert b'secondbrain_email_deliveries_total{outcome="sent"} 1000.0' in bodies[0]
    assert len(queries) == len(one_collection), f"{len(queries)} queries for 50 scrapes"


def _insert_delivery_logs(cursor, *, notification_id: int, count: int, outcome: str) -> None:
    cursor.execute(
        "INSERT INTO notification_delivery_logs"
        " (notification_id, attempt, outcome, error, provider_response, duration_ms, created_at)"
        " SELECT %s, i, %s, '', '', 1, now() FROM generate_series(1, %s) AS i",
        [notification_id, outcome, count],
    )


def _rows_read_by_one_collection() -> dict[str, int]:
    """Rows each table gave up (sequential reads + index fetches) during one collection, from
    this transaction's own statistics (pg_stat_xact_*: current, not flushed later)."""
    stats = "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables"
    with connection.cursor() as cursor:
        cursor.execute(stats)
        before = dict(cursor.fetchall())
        assert list(SecondbrainCollector().collect())
        cursor.execute(stats)
        after = dict(cursor.fetchall())
    return {table: after[table] - before.get(table, 0) for table in after}


def test_a_collection_reads_as_many_rows_with_fifty_thousand_logs_as_with_a_thousand():
    """The scrape's cost must not grow with the tables: counters and the unfinished
    notifications (few, indexed) are read, not every delivery log, ledger row or finished job."""
    owner = make_user("busy")
    recipient = make_recipient(owner)
    notification = NotificationJob.objects.create(owner=owner, recipient=recipient, status="sent")
    NotificationJob.objects.create(owner=owner, recipient=recipient, status="pending")

    def grow(count: int) -> None:
        with connection.cursor() as cursor:
            _insert_delivery_logs(cursor, notification_id=notification.id, count=count, outcome="sent")
            cursor.execute(
                "INSERT INTO llm_usage (purpose, model, input_tokens, output_tokens, cost_usd)"
                " SELECT 'note_enrichment', 'claude-haiku-4-5', 10, 2, 0.0001 FROM generate_series(1, %s)",
                [count],
            )
            cursor.execute(
                "INSERT INTO notification_jobs (owner_id, recipient_id, notification_type, delivery_method,"
                " priority, payload, status, retry_count, provider_message_id, error, created_at)"
                " SELECT %s, %s, 'system', 'email', 'normal', '{}', 'sent', 0, '', '', now()"
                " FROM generate_series(1, %s)",
                [owner.id, recipient.id, count],
            )
            cursor.execute("ANALYZE notification_jobs, notification_delivery_logs, llm_usage")

    grow(1_000)
    small = _rows_read_by_one_collection()
    grow(49_000)
    large = _rows_read_by_one_collection()

    assert large.get("notification_delivery_logs", 0) == 0, large
    assert large.get("llm_usage", 0) == 0, large
    assert sum(large.values()) == sum(small.values()), (small, large)


def test_purging_delivery_logs_and_the_ledger_does_not_lower_the_counters(client):
    owner = make_user("purged")
    notification = NotificationJob.objects.create(owner=owner, recipient=make_recipient(owner), status="sent")
    with connection.cursor() as cursor:
        _insert_delivery_logs(cursor, notification_id=notification.id, count=3, outcome="sent")
    LlmUsage.objects.create(purpose="weekly_digest", model="m", input_tokens=5, output_tokens=1, cost_usd=1)
    before = scrape(client)
    assert value(before, "secondbrain_email_deliveries_total", outcome="sent") == 3

    DeliveryLog.objects.all().delete()
    LlmUsage.objects.all().delete()
    after = scrape(client)

    assert value(after, "secondbrain_email_deliveries_total", outcome="sent") == 3
    assert value(after, "secondbrain_llm_calls_total", purpose="weekly_digest", model="m") == 1
    assert value(after, "secondbrain_llm_tokens_total", purpose="weekly_digest", model="m", direction="input") == 5


@pytest.mark.django_db(transaction=True)
def test_counters_equal_the_aggregates_after_inserts_from_several_sessions(client):
    owner = make_user("many")
    notification = NotificationJob.objects.create(owner=owner, recipient=make_recipient(owner), status="sent")
    outcomes = DeliveryLog.Outcome.values
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            start.wait(timeout=30)
            for statement in range(10):
                DeliveryLog.objects.bulk_create(
                    [
                        DeliveryLog(notification=notification, attempt=i, outcome=outcomes[(worker + i) % 5])
                        for i in range(statement + 1)
                    ]
                )
                LlmUsage.objects.create(
                    purpose=f"p{worker % 2}",
                    model="claude-haiku-4-5",
                    input_tokens=statement,
                    output_tokens=worker,
                    cost_usd=Decimal("0.000125"),
                )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors

    samples = scrape(client)
    for outcome in outcomes:
        expected = DeliveryLog.objects.filter(outcome=outcome).count()
        assert value(samples, "secondbrain_email_deliveries_total", outcome=outcome) == expected
    for purpose in ("p0", "p1"):
        rows = LlmUsage.objects.filter(purpose=purpose)
        labels = {"purpose": purpose, "model": "claude-haiku-4-5"}
        assert value(samples, "secondbrain_llm_calls_total", **labels) == rows.count() == 20
        assert value(samples, "secondbrain_llm_tokens_total", direction="input", **labels) == sum(
            r.input_tokens for r in rows
        )
        assert value(samples, "secondbrain_llm_tokens_total", direction="output", **labels) == sum(
            r.output_tokens for r in rows
        )
        assert value(samples, "secondbrain_llm_spend_usd_total", **labels) == pytest.approx(20 * 0.000125)
