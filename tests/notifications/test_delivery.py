"""E-mail delivery end to end: real workers on PostgreSQL, a real SMTP server on 127.0.0.1."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from notifications import services
from notifications.models import DeliveryLog, NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import jobs, run_worker
from tests.jobs.workers import retry_delay

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def owner(transactional_db):
    return make_user("olga")


@pytest.fixture
def rita(owner):
    return make_recipient(owner)


def send(owner, recipient, **extra) -> NotificationJob:
    fields = {"subject": "Hello", "body": "Hi <b>there</b>", "notification_type": "system", "priority": "normal"}
    return services.notification_send_email(owner=owner, recipient=recipient, **{**fields, **extra})


def fast_forward_all() -> None:
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo'")


def test_a_notification_is_delivered_once_with_a_delivery_log(owner, rita, smtp):
    notification = send(owner, rita)
    run_worker()

    [message] = smtp.messages
    assert message["To"] == "rita@example.com" and message["X-Envelope-To"] == "rita@example.com"
    assert message["Subject"] == "Hello"
    assert message.get_content().strip() == "Hi <b>there</b>"
    notification.refresh_from_db()
    assert notification.status == "sent"
    assert notification.provider_message_id == message["Message-ID"]
    assert notification.processed_at is not None and notification.retry_count == 1
    [log] = notification.delivery_logs.all()
    assert log.outcome == "sent" and log.provider_response.startswith("250 ") and log.duration_ms > 0
    assert jobs("notifications.deliver")[0]["status"] == "succeeded"


def test_a_second_job_for_a_delivered_notification_sends_nothing(owner, rita, smtp):
    from notifications.tasks import notification_deliver

    notification = send(owner, rita)
    run_worker()
    notification_deliver.defer(notification_id=notification.id)  # e.g. a retry after a lost ack
    run_worker()
    assert len(smtp.messages) == 1
    assert [j["status"] for j in jobs("notifications.deliver")] == ["succeeded", "succeeded"]


def test_scheduled_for_is_honoured_without_polling(owner, rita, smtp):
    notification = send(owner, rita, scheduled_for=timezone.now() + timedelta(hours=1))
    run_worker()
    assert smtp.messages == [] and NotificationJob.objects.get(id=notification.id).status == "pending"
    fast_forward_all()  # time passes
    run_worker()
    assert len(smtp.messages) == 1


def test_urgent_goes_before_low(owner, rita, smtp):
    low = send(owner, rita, priority="low", subject="low")
    normal = send(owner, rita, priority="normal", subject="normal")
    urgent = send(owner, rita, priority="urgent", subject="urgent")
    high = send(owner, rita, priority="high", subject="high")
    run_worker(concurrency=1)
    assert [m["Subject"] for m in smtp.messages] == ["urgent", "high", "normal", "low"]
    assert {n.id for n in (low, normal, urgent, high)} == {int(i) for i in smtp.notification_ids()}


def test_a_muted_recipient_gets_nothing_and_the_job_is_cancelled_with_a_reason(owner, smtp):
    muted = make_recipient(owner, email="quiet@example.com", muted_until=timezone.now() + timedelta(days=1))
    forever = make_recipient(owner, email="never@example.com", muted_indefinitely=True)
    unmuted = make_recipient(owner, email="again@example.com", muted_until=timezone.now() - timedelta(minutes=1))
    a, b, c = send(owner, muted), send(owner, forever), send(owner, unmuted)
    run_worker()
    assert [m["To"] for m in smtp.messages] == ["again@example.com"]
    for notification in (a, b):
        notification.refresh_from_db()
        assert notification.status == "cancelled" and "muted" in notification.error
        assert notification.delivery_logs.get().outcome == "cancelled"
    assert NotificationJob.objects.get(id=c.id).status == "sent"


def test_4xx_replies_are_retried_with_backoff_then_delivered_once(owner, rita, smtp):
    smtp.reply_to_data("451 4.3.0 Try again later", times=2)
    notification = send(owner, rita)
    delays = []
    for _ in range(2):
        run_worker()
        notification.refresh_from_db()
        assert notification.status == "pending" and "451" in notification.error
        [job] = jobs("notifications.deliver")
        delays.append(round(retry_delay(job["id"])))
        fast_forward_all()
    run_worker()
    assert delays == [2, 4]
    assert len(smtp.messages) == 1
    notification.refresh_from_db()
    assert notification.status == "sent" and notification.retry_count == 3
    assert [log.outcome for log in notification.delivery_logs.all()] == [
        "transient_failure",
        "transient_failure",
        "sent",
    ]


def test_refused_connections_exhaust_the_attempts_then_the_owner_retries(owner, rita, smtp, settings):
    settings.NOTIFICATIONS_BREAKER_THRESHOLD = 100  # this test is about retries, not the breaker
    smtp.stop()
    notification = send(owner, rita)
    for _ in range(3):
        run_worker()
        fast_forward_all()
    notification.refresh_from_db()
    assert notification.status == "failed" and notification.processed_at is not None
    assert "Connection" in notification.error or "refused" in notification.error.lower()
    assert notification.delivery_logs.count() == 3
    assert jobs("notifications.deliver")[0]["status"] == "failed"

    smtp.start()
    services.notification_retry(notification=notification)
    run_worker()
    assert len(smtp.messages) == 1
    assert NotificationJob.objects.get(id=notification.id).status == "sent"


def test_a_5xx_reply_is_permanent_and_not_retried(owner, rita, smtp):
    smtp.reply_to_data("550 5.1.1 No such user here")
    notification = send(owner, rita)
    run_worker()
    notification.refresh_from_db()
    assert notification.status == "failed" and "550" in notification.error
    [log] = notification.delivery_logs.all()
    assert log.outcome == "permanent_failure"
    assert jobs("notifications.deliver")[0]["status"] == "failed"
    assert smtp.messages == []


def test_cancelled_before_the_worker_runs_sends_nothing(owner, rita, smtp):
    notification = send(owner, rita)
    services.notification_cancel(notification=notification)
    run_worker()
    assert smtp.messages == []


def test_the_circuit_breaker_opens_postpones_and_a_probe_closes_it(owner, rita, smtp, settings, client):
    settings.NOTIFICATIONS_BREAKER_THRESHOLD = 2
    settings.NOTIFICATIONS_BREAKER_COOLDOWN_SECONDS = 30
    smtp.stop()
    notifications = [send(owner, rita, subject=f"n{i}") for i in range(5)]
    run_worker()

    logs = list(DeliveryLog.objects.values_list("outcome", flat=True))
    assert logs.count("transient_failure") == 2  # then the breaker opened...
    assert logs.count("postponed") == 3  # ...and the rest waited without trying
    postponed = [n for n in notifications if NotificationJob.objects.get(id=n.id).retry_count == 0]
    assert len(postponed) == 3  # no attempt burned
    client.force_login(make_user("operator", is_staff=True))  # the details of health are for staff
    health = client.get("/api/health/").json()
    assert health["notifications"]["circuit_breaker"]["state"] == "open"
    assert any("circuit breaker is open" in w for w in health["warnings"])

    smtp.start()
    fast_forward_all()  # the cooldown passes
    with connection.cursor() as cursor:
        cursor.execute("UPDATE jobs_circuit_breakers SET opened_until = now()")
    run_worker()
    assert sorted(m["Subject"] for m in smtp.messages) == [f"n{i}" for i in range(5)]
    assert client.get("/api/health/").json()["notifications"]["circuit_breaker"]["state"] == "closed"
