from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from notifications import services
from notifications.models import DeliveryLog, NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import client_for, jobs

pytestmark = pytest.mark.django_db


def _send(owner, recipient) -> NotificationJob:
    return services.notification_send_email(
        owner=owner, recipient=recipient, subject="S", body="B", notification_type="system", priority="normal"
    )


@pytest.fixture
def staff_client(client):
    client.force_login(make_user("admin1", is_staff=True, is_superuser=True))
    return client


def test_admin_lists_notifications_logs_and_recipients_with_filters(staff_client):
    owner = make_user("sam")
    notification = _send(owner, make_recipient(owner))
    DeliveryLog.objects.create(notification=notification, attempt=1, outcome="sent", provider_response="250 ok")
    for path in (
        "/admin/notifications/notificationjob/?status__exact=pending&delivery_method__exact=email",
        "/admin/notifications/deliverylog/?outcome__exact=sent",
        "/admin/notifications/recipient/",
        f"/admin/notifications/notificationjob/{notification.id}/change/",
    ):
        assert staff_client.get(path).status_code == 200, path


def test_admin_lists_sent_notifications_whose_server_reply_is_not_on_record(staff_client):
    owner = make_user("sam")
    recipient = make_recipient(owner)
    confirmed, unconfirmed, pending = _send(owner, recipient), _send(owner, recipient), _send(owner, recipient)
    NotificationJob.objects.filter(id__in=[confirmed.id, unconfirmed.id]).update(
        status="sent", processed_at=timezone.now(), provider_message_id="<m@x>"
    )
    DeliveryLog.objects.create(notification=confirmed, attempt=1, outcome="sent", provider_response="250 ok")
    DeliveryLog.objects.create(notification=unconfirmed, attempt=1, outcome="transient_failure")
    page = staff_client.get("/admin/notifications/notificationjob/?reply=missing")
    assert page.status_code == 200
    listed = {n.id for n in page.context["cl"].result_list}
    assert listed == {unconfirmed.id}, (listed, confirmed.id, pending.id)


def test_admin_actions_retry_failed_and_cancel_pending(staff_client):
    owner = make_user("tess")
    recipient = make_recipient(owner)
    failed, pending = _send(owner, recipient), _send(owner, recipient)
    NotificationJob.objects.filter(id=failed.id).update(status="failed")
    url = "/admin/notifications/notificationjob/"
    staff_client.post(url, {"action": "retry_failed", "_selected_action": [failed.id, pending.id]})
    staff_client.post(url, {"action": "cancel_pending", "_selected_action": [pending.id]})
    assert NotificationJob.objects.get(id=failed.id).status == "pending"
    assert NotificationJob.objects.get(id=pending.id).status == "cancelled"
    statuses = sorted(j["status"] for j in jobs("notifications.deliver"))
    assert statuses == ["cancelled", "todo", "todo"]  # the retried one got a fresh job


NOTIFICATIONS = "/admin/notifications/notificationjob/"


def _notification_staff(username: str, *job_perms: str):
    """Staff who may open and edit the notifications in the admin, plus `job_perms` of jobs."""
    user = make_user(username, is_staff=True)
    codenames = [("notifications", "view_notificationjob"), ("notifications", "change_notificationjob")]
    codenames += [("jobs", perm) for perm in job_perms]
    for app_label, codename in codenames:
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    client = Client()
    client.force_login(user)
    return client


def _offered(client) -> set[str]:
    response = client.get(NOTIFICATIONS)
    assert response.status_code == 200
    form = response.context["action_form"]
    return {name for name, _ in form.fields["action"].choices if name} if form is not None else set()


def test_admin_retry_and_cancel_need_the_job_permissions():
    owner = make_user("uma")
    recipient = make_recipient(owner)
    failed, pending = _send(owner, recipient), _send(owner, recipient)
    NotificationJob.objects.filter(id=failed.id).update(status="failed")

    plain = _notification_staff("plain")
    assert _offered(plain) == set()
    # Not offered, so a forged POST does nothing.
    plain.post(NOTIFICATIONS, {"action": "retry_failed", "_selected_action": [failed.id]})
    plain.post(NOTIFICATIONS, {"action": "cancel_pending", "_selected_action": [pending.id]})
    assert NotificationJob.objects.get(id=failed.id).status == "failed"
    assert NotificationJob.objects.get(id=pending.id).status == "pending"

    retrier = _notification_staff("retrier", "retry_job")
    assert _offered(retrier) == {"retry_failed"}
    retrier.post(NOTIFICATIONS, {"action": "cancel_pending", "_selected_action": [pending.id]})
    assert NotificationJob.objects.get(id=pending.id).status == "pending"
    retrier.post(NOTIFICATIONS, {"action": "retry_failed", "_selected_action": [failed.id]})
    assert NotificationJob.objects.get(id=failed.id).status == "pending"

    canceller = _notification_staff("canceller", "cancel_job")
    assert _offered(canceller) == {"cancel_pending"}
    canceller.post(NOTIFICATIONS, {"action": "cancel_pending", "_selected_action": [pending.id]})
    assert NotificationJob.objects.get(id=pending.id).status == "cancelled"


def test_bulk_send_costs_the_same_queries_for_ten_or_two_thousand_recipients(django_assert_max_num_queries, user):
    api = client_for(user)
    few = [make_recipient(user, email=f"a{i}@example.com").id for i in range(10)]
    many = [r.id for r in _bulk_recipients(user, 2000)]

    def post(ids):
        return api.post(
            "/api/notifications/send-bulk/", {"recipient_ids": ids, "subject": "S", "body": "B"}, format="json"
        )

    with django_assert_max_num_queries(12) as small:
        assert post(few).status_code == 202
    with django_assert_max_num_queries(len(small.captured_queries)):
        assert post(many).status_code == 202
    assert NotificationJob.objects.count() == 2010
    # In jobs of NOTIFICATIONS_BATCH_SIZE (20): one for the ten, a hundred for the two thousand.
    runs = [job["args"]["notification_ids"] for job in jobs("notifications.deliver_many")]
    assert sorted(len(run) for run in runs) == [10] + [20] * 100
    assert sorted(i for run in runs for i in run) == sorted(NotificationJob.objects.values_list("id", flat=True))


def _bulk_recipients(owner, n):
    from notifications.models import Recipient

    return Recipient.objects.bulk_create(
        [Recipient(owner=owner, name=f"R{i}", email=f"b{i}@example.com") for i in range(n)]
    )


def test_health_warns_on_failure_rate_and_backlog(settings):
    settings.NOTIFICATIONS_WARN_BACKLOG = 2
    owner = make_user("uma")
    recipient = make_recipient(owner)
    sent = [_send(owner, recipient) for _ in range(3)]
    NotificationJob.objects.filter(id__in=[n.id for n in sent[:2]]).update(status="failed", processed_at=timezone.now())
    NotificationJob.objects.filter(id=sent[2].id).update(status="sent", processed_at=timezone.now())
    for _ in range(3):
        _send(owner, recipient)
    body = client_for(make_user("olga", is_staff=True)).get("/api/health/").json()
    assert body["notifications"]["failure_rate_15m"] == pytest.approx(0.6667, abs=1e-3)
    assert body["notifications"]["backlog"] == 3
    assert any("failure rate" in w for w in body["warnings"])
    assert any("3 notifications are due" in w for w in body["warnings"])
