"""Retention of notification jobs and delivery logs: the periodic `core.purge_expired` task, run
by a real worker, runs the purge the notifications app registered. It deletes finished
notifications and old delivery logs past their age, in batches, and never a notification that
is still waiting or being delivered."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from django.utils import timezone
from procrastinate.exceptions import AlreadyEnqueued

from notifications.models import DeliveryLog, NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import jobs, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


def _notification(recipient, status: str, *, age_days: float, processed_days: float | None = None) -> NotificationJob:
    now = timezone.now()
    notification = NotificationJob.objects.create(
        owner=recipient.owner, recipient=recipient, status=status, payload={"subject": "s", "body": "b"}
    )
    processed = None if processed_days is None else now - timedelta(days=processed_days)
    NotificationJob.objects.filter(id=notification.id).update(
        created_at=now - timedelta(days=age_days), processed_at=processed
    )
    return notification


def _log(notification: NotificationJob, *, age_days: float) -> DeliveryLog:
    log = DeliveryLog.objects.create(notification=notification, attempt=1, outcome="sent")
    DeliveryLog.objects.filter(id=log.id).update(created_at=timezone.now() - timedelta(days=age_days))
    return log


def _purge_with_a_real_worker() -> None:
    from core.tasks import purge_expired_rows

    with contextlib.suppress(AlreadyEnqueued):  # a worker that ran before deferred the periodic run
        purge_expired_rows.defer()
    run_worker(queues=["maintenance"])
    # The worker may also have deferred the periodic run that was due: each ran to the end.
    statuses = [j["status"] for j in jobs("core.purge_expired")]
    assert statuses and set(statuses) == {"succeeded"}


def test_finished_notifications_and_old_delivery_logs_are_purged_in_batches(settings):
    settings.NOTIFICATIONS_RETENTION_DAYS = 90
    settings.NOTIFICATIONS_DELIVERY_LOG_RETENTION_DAYS = 30
    settings.JOBS_RETENTION_BATCH_SIZE = 2  # several batches
    owner = make_user("purdy")
    rita = make_recipient(owner)
    old_finished = [
        _notification(rita, status, age_days=100, processed_days=99)
        for status in ("sent", "sent", "failed", "cancelled", "sent")
    ]
    for notification in old_finished:
        _log(notification, age_days=99)
    old_pending = _notification(rita, "pending", age_days=200)  # scheduled far ahead: kept
    old_processing = _notification(rita, "processing", age_days=200)
    young_sent = _notification(rita, "sent", age_days=10, processed_days=10)
    sent_late = _notification(rita, "sent", age_days=120, processed_days=5)  # scheduled, sent lately
    old_log = _log(young_sent, age_days=40)
    young_log = _log(young_sent, age_days=10)
    pending_old_log = _log(old_pending, age_days=40)

    _purge_with_a_real_worker()

    kept = set(NotificationJob.objects.values_list("id", flat=True))
    assert kept == {old_pending.id, old_processing.id, young_sent.id, sent_late.id}
    logs = set(DeliveryLog.objects.values_list("id", flat=True))
    assert logs == {young_log.id}
    assert old_log.id not in logs and pending_old_log.id not in logs


def test_the_purge_is_registered_with_the_periodic_purge():
    from core.services import expired_rows_purge

    assert expired_rows_purge() == {
        "idempotency_keys": 0,
        "cache": 0,
        "throttle_buckets": 0,
        "quota_counters": 0,
        "notifications.notifications": 0,
        "notifications.delivery_logs": 0,
        "notes.import_files": 0,
    }
