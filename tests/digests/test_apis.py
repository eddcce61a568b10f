from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from django.utils import timezone

from digests import services
from digests.models import RecipientDigestSchedule, WeeklyDigest
from tests.factories import make_recipient
from tests.helpers import client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def rita(user):
    return make_recipient(user)


def _create(api, recipient, **extra):
    payload = {
        "recipient_id": recipient.id,
        "frequency": "weekly",
        "delivery_time": "08:30:00",
        "delivery_day": 1,
        "timezone": "Europe/Paris",
        **extra,
    }
    return api.post("/api/digest-schedules/", payload, format="json")


def test_create_computes_the_next_digest_in_the_recipients_time_zone(api, rita):
    response = _create(api, rita, max_notes=5, note_types=["idea"], tags=["#Work"])
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["tags"] == ["work"] and body["note_types"] == ["idea"] and body["max_notes"] == 5
    next_at = datetime.fromisoformat(body["next_digest_scheduled"].replace("Z", "+00:00"))
    local = next_at.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert local.isoweekday() == 1 and local.time() == time(8, 30)
    assert next_at > timezone.now()


def test_patch_recomputes_the_next_digest(api, rita):
    # Weekly on the day three days from now (Paris): daily then comes two days sooner, whatever
    # today is (weekly on Monday failed every Sunday after 08:30, both being tomorrow 08:30).
    in_three_days = timezone.now().astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris")) + timedelta(days=3)
    sid = _create(api, rita, delivery_day=in_three_days.isoweekday()).json()["id"]
    before = RecipientDigestSchedule.objects.get(id=sid).next_digest_scheduled
    response = api.patch(f"/api/digest-schedules/{sid}/", {"frequency": "daily", "delivery_day": None}, format="json")
    assert response.status_code == 200, response.json()
    after = RecipientDigestSchedule.objects.get(id=sid).next_digest_scheduled
    assert after != before and (after - timezone.now()).total_seconds() <= 86400


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"frequency": "weekly", "delivery_day": 8}, "delivery_day"),
        ({"frequency": "weekly", "delivery_day": None}, "delivery_day"),
        ({"frequency": "monthly", "delivery_day": 32}, "delivery_day"),
        ({"frequency": "monthly", "delivery_day": None}, "delivery_day"),
        ({"frequency": "daily", "delivery_day": 3}, "delivery_day"),
        ({"frequency": "hourly"}, "frequency"),
        ({"delivery_time": "25:00"}, "delivery_time"),
        ({"delivery_time": "8 o'clock"}, "delivery_time"),
        ({"max_notes": 0}, "max_notes"),
        ({"note_types": ["poem"]}, "note_types"),
    ],
)
def test_bad_input_is_a_400_and_writes_nothing(api, rita, extra, field):
    response = _create(api, rita, **extra)
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert RecipientDigestSchedule.objects.count() == 0


def test_another_users_recipient_and_schedule(api, rita, other_user):
    theirs = make_recipient(other_user, email="t@example.com")
    response = _create(api, theirs)
    assert response.status_code == 400 and "recipient_id" in response.json()
    sid = _create(api, rita).json()["id"]
    intruder = client_for(other_user)
    assert intruder.get(f"/api/digest-schedules/{sid}/").status_code == 404
    assert intruder.patch(f"/api/digest-schedules/{sid}/", {"active": False}, format="json").status_code == 404
    assert intruder.delete(f"/api/digest-schedules/{sid}/").status_code == 404
    assert RecipientDigestSchedule.objects.get(id=sid).active is True


def test_list_filters(api, user, rita):
    other = make_recipient(user, email="o@example.com")
    _create(api, rita)
    _create(api, other, frequency="daily", delivery_day=None, active=False)
    assert api.get(f"/api/digest-schedules/?recipient={other.id}").json()["count"] == 1
    assert api.get("/api/digest-schedules/?frequency=weekly").json()["count"] == 1
    assert api.get("/api/digest-schedules/?active=false").json()["count"] == 1
    assert api.get("/api/digest-schedules/").json()["count"] == 2


def test_digests_are_readable_by_their_owner_only(api, user, other_user):
    end = datetime(2026, 11, 20, 2, tzinfo=UTC)
    digest = services.weekly_digest_generate(user_id=user.id, period_end=end)
    assert [d["id"] for d in api.get("/api/digests/").json()["results"]] == [digest.id]
    assert api.get(f"/api/digests/{digest.id}/").json()["content"] == "No new notes this week."
    assert client_for(other_user).get(f"/api/digests/{digest.id}/").status_code == 404
    assert WeeklyDigest.objects.count() == 1


def test_digests_and_schedules_in_the_admin(client, user, rita):
    from tests.factories import make_user

    services.recipient_digest_schedule_create(
        owner=user, recipient=rita, frequency="daily", delivery_time=time(8), timezone="UTC"
    )
    services.weekly_digest_generate(user_id=user.id, period_end=datetime(2026, 11, 20, 2, tzinfo=UTC))
    client.force_login(make_user("boss", is_staff=True, is_superuser=True))
    assert client.get("/admin/digests/recipientdigestschedule/?frequency__exact=daily").status_code == 200
    assert client.get("/admin/digests/weeklydigest/").status_code == 200
