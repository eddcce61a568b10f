from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from notifications.models import DeliveryLog, NotificationJob, Recipient
from tests.factories import make_recipient
from tests.helpers import client_for, jobs

pytestmark = pytest.mark.django_db


@pytest.fixture
def rita(user):
    return make_recipient(user)


def _send(api, recipient, **extra):
    payload = {"recipient_id": recipient.id, "subject": "Hello", "body": "Hi there", **extra}
    return api.post("/api/notifications/send-email/", payload, format="json")


# --- recipients ----------------------------------------------------------------------------
def test_recipient_crud_is_owner_scoped(api, other_user):
    created = api.post(
        "/api/recipients/",
        {"name": "Mum", "email": "mum@example.com", "relationship": "family", "timezone": "Europe/Paris"},
        format="json",
    )
    assert created.status_code == 201
    rid = created.json()["id"]
    assert api.patch(f"/api/recipients/{rid}/", {"muted_indefinitely": True}, format="json").json()[
        "muted_indefinitely"
    ]
    assert api.get("/api/recipients/").json()["count"] == 1
    intruder = client_for(other_user)
    assert intruder.get(f"/api/recipients/{rid}/").status_code == 404
    assert intruder.delete(f"/api/recipients/{rid}/").status_code == 404
    assert api.delete(f"/api/recipients/{rid}/").status_code == 204


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "X", "email": "not-an-email"}, "email"),
        ({"name": "X", "email": "x@example.com", "timezone": "Mars/Olympus"}, "timezone"),
        ({"name": 5, "email": "x@example.com"}, "name"),
        ({"email": "x@example.com"}, "name"),
    ],
)
def test_recipient_bad_input_is_400(api, payload, field):
    response = api.post("/api/recipients/", payload, format="json")
    assert response.status_code == 400 and field in response.json()
    assert Recipient.objects.count() == 0


# --- send-email ----------------------------------------------------------------------------
def test_send_email_answers_202_at_once_and_defers_a_job_with_ids_only(api, rita):
    response = _send(api, rita, priority="urgent")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["message"]
    notification = NotificationJob.objects.get(id=body["notification_id"])
    assert body["job_id"] == notification.id  # the deprecated alias, same value
    assert notification.status == "pending" and notification.payload == {"subject": "Hello", "body": "Hi there"}
    [job] = jobs("notifications.deliver")
    assert job["queue_name"] == "notifications"
    assert job["args"] == {"notification_id": notification.id}
    assert notification.procrastinate_job_id == job["id"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT priority FROM procrastinate_jobs WHERE id = %s", [job["id"]])
        assert cursor.fetchone()[0] == 30


def test_scheduled_for_defers_the_job_to_that_time(api, rita):
    at = timezone.now() + timedelta(hours=2)
    response = _send(api, rita, scheduled_for=at.isoformat())
    assert response.status_code == 202
    [job] = jobs("notifications.deliver")
    assert abs((job["scheduled_at"] - at).total_seconds()) < 0.01


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"delivery_method": "sms"}, "delivery_method"),
        ({"delivery_method": "whatsapp"}, "delivery_method"),
        ({"delivery_method": "pigeon"}, "delivery_method"),
        ({"scheduled_for": "next tuesday"}, "scheduled_for"),
        ({"scheduled_for": "2026-13-45T99:00:00Z"}, "scheduled_for"),
        ({"priority": "whenever"}, "priority"),
        ({"notification_type": "spam"}, "notification_type"),
        ({"body": "x" * 100_001}, "body"),
        ({"subject": "two\nlines"}, "subject"),
        ({"subject": ""}, "subject"),
        ({"recipient_id": "abc"}, "recipient_id"),
        ({"recipient_id": 999999}, "recipient_id"),
    ],
)
def test_send_email_bad_input_is_a_400_with_field_errors_and_writes_nothing(api, rita, extra, field):
    response = _send(api, rita, **extra)
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert NotificationJob.objects.count() == 0
    assert jobs() == []


def test_sms_is_refused_as_not_supported_yet(api, rita):
    response = _send(api, rita, delivery_method="sms")
    assert "not supported yet" in response.json()["delivery_method"][0]


def test_another_users_recipient_is_unknown(api, other_user):
    theirs = make_recipient(other_user, email="theirs@example.com")
    response = _send(api, theirs)
    assert response.status_code == 400 and "recipient_id" in response.json()


# --- send-bulk -----------------------------------------------------------------------------
def test_send_bulk_writes_all_rows_and_jobs_in_one_go(api, user):
    recipients = [make_recipient(user, email=f"r{i}@example.com") for i in range(5)]
    response = api.post(
        "/api/notifications/send-bulk/",
        {"recipient_ids": [r.id for r in recipients], "subject": "News", "body": "Hello all", "priority": "low"},
        format="json",
    )
    assert response.status_code == 202
    ids = response.json()["notification_ids"]
    assert len(ids) == 5 and response.json()["job_ids"] == ids  # the deprecated alias, same value
    # One job delivers them all (up to NOTIFICATIONS_BATCH_SIZE in one), and each row links it.
    (job,) = jobs("notifications.deliver_many")
    assert job["args"]["notification_ids"] == ids and jobs("notifications.deliver") == []
    assert {n.procrastinate_job_id for n in NotificationJob.objects.filter(id__in=ids)} == {job["id"]}


def test_send_bulk_with_one_unknown_recipient_writes_nothing(api, user, other_user):
    mine = make_recipient(user)
    theirs = make_recipient(other_user, email="t@example.com")
    response = api.post(
        "/api/notifications/send-bulk/",
        {"recipient_ids": [mine.id, theirs.id], "subject": "S", "body": "B"},
        format="json",
    )
    assert response.status_code == 400 and "recipient_ids" in response.json()
    assert NotificationJob.objects.count() == 0 and jobs() == []


def test_send_bulk_limits_the_number_of_recipients(api, user, settings):
    settings.NOTIFICATIONS_MAX_BULK_RECIPIENTS = 2
    ids = [make_recipient(user, email=f"r{i}@example.com").id for i in range(3)]
    response = api.post(
        "/api/notifications/send-bulk/", {"recipient_ids": ids, "subject": "S", "body": "B"}, format="json"
    )
    assert response.status_code == 400
    assert (
        api.post(
            "/api/notifications/send-bulk/", {"recipient_ids": [], "subject": "S", "body": "B"}, format="json"
        ).status_code
        == 400
    )


# --- jobs: list, detail, cancel, retry, metrics --------------------------------------------
def test_list_filters_and_sorts(api, user, rita):
    other = make_recipient(user, email="o@example.com")
    first = _send(api, rita).json()["job_id"]
    second = _send(api, other, notification_type="note_shared").json()["job_id"]
    NotificationJob.objects.filter(id=first).update(status="sent", processed_at=timezone.now())

    def ids(query: str) -> list[int]:
        return [n["id"] for n in api.get(f"/api/notifications/jobs/?{query}").json()["results"]]

    assert ids("status=sent") == [first]
    assert ids("notification_type=note_shared") == [second]
    assert ids(f"recipient={other.id}") == [second]
    assert ids("delivery_method=email&ordering=created_at") == [first, second]
    assert ids("ordering=-created_at") == [second, first]
    assert api.get("/api/notifications/jobs/?status=bogus").status_code == 400


def test_detail_has_recipient_logs_and_timings(api, rita):
    at = timezone.now() + timedelta(minutes=10)
    job_id = _send(api, rita, scheduled_for=at.isoformat()).json()["job_id"]
    DeliveryLog.objects.create(notification_id=job_id, attempt=1, outcome="transient_failure", error="SMTP 451")
    body = api.get(f"/api/notifications/jobs/{job_id}/").json()
    assert body["recipient"]["email"] == "rita@example.com"
    assert [log["outcome"] for log in body["delivery_logs"]] == ["transient_failure"]
    assert 590 < body["seconds_until_scheduled"] <= 600
    assert body["processing_time_ms"] is None


def test_cancel_a_pending_job_cancels_its_procrastinate_job(api, rita):
    job_id = _send(api, rita).json()["job_id"]
    response = api.delete(f"/api/notifications/jobs/{job_id}/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert jobs("notifications.deliver")[0]["status"] == "cancelled"


def test_cancel_is_409_once_sent_or_running(api, rita):
    sent = _send(api, rita).json()["job_id"]
    NotificationJob.objects.filter(id=sent).update(status="sent")
    response = api.delete(f"/api/notifications/jobs/{sent}/")
    assert response.status_code == 409 and "sent" in response.json()["detail"]

    running = _send(api, rita).json()["job_id"]
    job_id = NotificationJob.objects.get(id=running).procrastinate_job_id
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", [job_id])
    response = api.delete(f"/api/notifications/jobs/{running}/")
    assert response.status_code == 409 and "right now" in response.json()["detail"]
    assert NotificationJob.objects.get(id=running).status == "pending"


def test_retry_requeues_only_failed_jobs(api, rita):
    job_id = _send(api, rita).json()["job_id"]
    assert api.post(f"/api/notifications/jobs/{job_id}/retry/").status_code == 409
    NotificationJob.objects.filter(id=job_id).update(status="failed", error="SMTP 451")
    response = api.post(f"/api/notifications/jobs/{job_id}/retry/")
    assert response.status_code == 202 and response.json()["status"] == "pending"
    assert len([j for j in jobs("notifications.deliver") if j["status"] == "todo"]) == 2


def test_other_users_jobs_are_404(api, rita, other_user):
    job_id = _send(api, rita).json()["job_id"]
    intruder = client_for(other_user)
    assert intruder.get(f"/api/notifications/jobs/{job_id}/").status_code == 404
    assert intruder.delete(f"/api/notifications/jobs/{job_id}/").status_code == 404
    assert intruder.post(f"/api/notifications/jobs/{job_id}/retry/").status_code == 404
    assert intruder.get("/api/notifications/jobs/").json()["count"] == 0
    assert NotificationJob.objects.get(id=job_id).status == "pending"


def test_metrics(api, user, rita):
    now = timezone.now()
    ids = [_send(api, rita).json()["job_id"] for _ in range(5)]
    NotificationJob.objects.filter(id__in=ids[:3]).update(status="sent", processed_at=now)
    NotificationJob.objects.filter(id=ids[3]).update(status="failed", processed_at=now, error="SMTP 550")
    NotificationJob.objects.filter(id=ids[4]).update(scheduled_for=now - timedelta(minutes=5))
    old = _send(api, rita).json()["job_id"]
    NotificationJob.objects.filter(id=old).update(created_at=now - timedelta(hours=30))

    body = api.get("/api/notifications/metrics/?hours=24").json()
    assert body["total"] == 5
    assert body["by_status"] == {"pending": 1, "processing": 0, "sent": 3, "failed": 1, "cancelled": 0}
    assert body["success_rate"] == 0.75
    assert body["by_delivery_method"] == {"email": {"sent": 3, "failed": 1, "pending": 1}}
    assert [f["id"] for f in body["recent_failures"]] == [ids[3]]
    assert body["overdue"] == 1
    assert body["processing_time_ms"]["p95"] is not None
    assert api.get("/api/notifications/metrics/?hours=48").json()["total"] == 6
    assert api.get("/api/notifications/metrics/?hours=abc").status_code == 400
    assert api.get("/api/notifications/metrics/?hours=0").status_code == 400


def test_send_email_takes_six_statements_and_looks_the_recipient_up_unsorted(api, rita):
    """The request's statements, a guard on its cost (issue 14's HTTP figures): the token, the
    recipient, the quota, the notification, its job, the job's id on it (and the throttle's,
    off in the tests)."""
    _send(api, rita)  # the throttle's and the quota's rows exist
    with CaptureQueriesContext(connection) as queries:
        assert _send(api, rita).status_code == 202
    statements = [q["sql"] for q in queries.captured_queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))]
    lookups = [sql for sql in statements if sql.startswith("SELECT") and "notification_recipients" in sql]
    assert len(lookups) == 1 and "ORDER BY" not in lookups[0]
    assert len(statements) == 6, "\n".join(sql.strip()[:60] for sql in statements)
