"""The daily e-mail quota per user (EMAIL_DAILY_QUOTA_PER_USER): every send path counts, over
it the API answers 429 with the reason and Retry-After, and parallel requests never pass it."""

from __future__ import annotations

import pytest
from django.db import connection

from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import at_once, client_for


def _send(api, recipient, **extra):
    payload = {"recipient_id": recipient.id, "subject": "Hello", "body": "Hi there", **extra}
    return api.post("/api/notifications/send-email/", payload, format="json")


def _seconds_to_utc_midnight() -> float:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM date_trunc('day', now() AT TIME ZONE 'UTC') + interval '1 day'"
            " - (now() AT TIME ZONE 'UTC'))"
        )
        return float(cursor.fetchone()[0])


@pytest.mark.django_db
def test_send_email_over_the_daily_quota_is_429_with_the_reason_and_retry_after(api, user, other_user, settings):
    settings.EMAIL_DAILY_QUOTA_PER_USER = 2
    rita = make_recipient(user)
    assert [_send(api, rita).status_code for _ in range(2)] == [202, 202]

    refused = _send(api, rita)

    assert refused.status_code == 429
    assert "daily e-mail quota of 2" in refused.json()["detail"]
    retry_after = int(refused.headers["Retry-After"])
    assert 0 < retry_after <= _seconds_to_utc_midnight() + 1
    assert NotificationJob.objects.filter(owner=user).count() == 2
    # Another user's quota is their own.
    assert _send(client_for(other_user), make_recipient(other_user)).status_code == 202


@pytest.mark.django_db
def test_bulk_counts_every_recipient_and_is_all_or_nothing(api, user, settings):
    settings.EMAIL_DAILY_QUOTA_PER_USER = 3
    recipients = [make_recipient(user, email=f"r{i}@example.com") for i in range(2)]
    payload = {"recipient_ids": [r.id for r in recipients], "subject": "Hi", "body": "All of you"}
    assert api.post("/api/notifications/send-bulk/", payload, format="json").status_code == 202

    refused = api.post("/api/notifications/send-bulk/", payload, format="json")

    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert "quota" in refused.json()["detail"]
    assert NotificationJob.objects.count() == 2  # none of the second bulk
    assert _send(api, recipients[0]).status_code == 202  # the one e-mail left fits
    assert _send(api, recipients[0]).status_code == 429


@pytest.mark.django_db
def test_retrying_a_failed_notification_counts_against_the_quota(api, user, settings):
    settings.EMAIL_DAILY_QUOTA_PER_USER = 1
    rita = make_recipient(user)
    job_id = _send(api, rita).json()["job_id"]
    NotificationJob.objects.filter(id=job_id).update(status="failed")

    refused = api.post(f"/api/notifications/jobs/{job_id}/retry/")

    assert refused.status_code == 429
    assert NotificationJob.objects.get(id=job_id).status == "failed"


@pytest.mark.django_db(transaction=True)
def test_parallel_sends_at_quota_minus_one_let_exactly_one_through(settings):
    settings.EMAIL_DAILY_QUOTA_PER_USER = 5
    owner = make_user("paula")
    rita = make_recipient(owner)
    api = client_for(owner)
    assert [_send(api, rita).status_code for _ in range(4)] == [202] * 4

    statuses = at_once(8, lambda: _send(client_for(owner), rita).status_code)
    assert sorted(statuses) == [202] + [429] * 7
    assert NotificationJob.objects.filter(owner=owner).count() == 5


@pytest.mark.django_db(transaction=True)
def test_the_digest_sweep_sends_only_what_the_quota_allows_and_keeps_the_rest_for_later(settings):
    from datetime import UTC, datetime, time, timedelta

    from digests import services as digest_services
    from notes import services as note_services

    settings.EMAIL_DAILY_QUOTA_PER_USER = 2
    now = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    owner = make_user("dora")
    schedules = [
        digest_services.recipient_digest_schedule_create(
            owner=owner,
            now=now - timedelta(days=1),
            recipient=make_recipient(owner, email=f"d{i}@example.com"),
            frequency="daily",
            delivery_time=time(8, 0),
            timezone="UTC",
        )
        for i in range(3)
    ]
    note_services.note_create(owner=owner, content="a note for the digests")
    assert _send(client_for(owner), schedules[0].recipient).status_code == 202  # 1 of 2 used

    assert digest_services.digest_sweep(now=now) == 1

    assert NotificationJob.objects.filter(owner=owner, notification_type="digest").count() == 1
    unsent = [s for s in schedules if (s.refresh_from_db() or s.last_digest_sent) is None]
    assert len(unsent) == 2  # their notes wait for the next digest
    assert all(s.next_digest_scheduled > now for s in schedules)  # every schedule moved on
