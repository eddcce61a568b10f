"""The digest sweep: due schedules become one digest notification each, exactly once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, time, timedelta

import pytest
from django.db import connection, transaction

from digests import services
from digests.models import RecipientDigestSchedule
from digests.tasks import digest_sweep as digest_sweep_task
from notes import services as note_services
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import start_worker_process, stop_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def _schedule(owner, recipient, **extra) -> RecipientDigestSchedule:
    fields = {"recipient": recipient, "frequency": "daily", "delivery_time": time(8, 0), "timezone": "UTC"}
    return services.recipient_digest_schedule_create(owner=owner, now=NOW - timedelta(days=1), **{**fields, **extra})


def _note(owner, content, **extra):
    return note_services.note_create(owner=owner, content=content, **extra)


def test_a_due_schedule_sends_its_unsent_notes_once_and_moves_forward():
    owner = make_user("vic")
    recipient = make_recipient(owner)
    schedule = _schedule(owner, recipient)
    assert schedule.next_digest_scheduled == datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    _note(owner, "First #work note", title="One")
    _note(owner, "Second note")

    assert services.digest_sweep(now=NOW) == 1
    [digest] = NotificationJob.objects.filter(notification_type="digest")
    assert digest.recipient == recipient and "One" in digest.payload["body"] and "#work" in digest.payload["body"]
    schedule.refresh_from_db()
    assert schedule.last_digest_sent == NOW
    assert schedule.next_digest_scheduled == datetime(2026, 11, 24, 8, 0, tzinfo=UTC)

    assert services.digest_sweep(now=NOW) == 0  # not due any more
    _note(owner, "Third note")
    assert services.digest_sweep(now=NOW + timedelta(days=1)) == 1
    latest = NotificationJob.objects.filter(notification_type="digest").order_by("-id").first()
    assert "Third note" in latest.payload["body"] and "One" not in latest.payload["body"]


def test_filters_and_max_notes():
    owner = make_user("wes")
    schedule = _schedule(owner, make_recipient(owner), max_notes=2, tags=["work"])
    _note(owner, "a #work")
    _note(owner, "b #home")
    _note(owner, "c #work")
    _note(owner, "d #work")
    services.digest_sweep(now=NOW)
    body = NotificationJob.objects.get(notification_type="digest").payload["body"]
    assert "- a" in body and "- c" in body and "- b" not in body and "- d" not in body
    schedule.refresh_from_db()
    services.digest_sweep(now=NOW + timedelta(days=1))
    assert "- d" in NotificationJob.objects.order_by("-id").first().payload["body"]


def test_nothing_unsent_means_no_notification_but_the_schedule_moves():
    owner = make_user("xia")
    schedule = _schedule(owner, make_recipient(owner))
    assert services.digest_sweep(now=NOW) == 0
    schedule.refresh_from_db()
    assert schedule.last_digest_sent is None and schedule.next_digest_scheduled > NOW
    assert NotificationJob.objects.count() == 0


def test_muted_recipients_and_inactive_schedules_are_skipped():
    owner = make_user("yan")
    muted = make_recipient(owner, email="m@example.com", muted_indefinitely=True)
    _schedule(owner, muted)
    inactive = _schedule(owner, make_recipient(owner, email="i@example.com"), active=False)
    _note(owner, "something")
    assert services.digest_sweep(now=NOW) == 0
    assert NotificationJob.objects.count() == 0
    inactive.refresh_from_db()
    assert inactive.next_digest_scheduled == datetime(2026, 11, 23, 8, 0, tzinfo=UTC)  # untouched


def test_catch_up_sends_once_not_once_per_missed_period():
    owner = make_user("zed")
    schedule = _schedule(owner, make_recipient(owner))
    _note(owner, "while the workers were down")
    later = NOW + timedelta(days=5)  # five daily runs were missed
    assert services.digest_sweep(now=later) == 1
    assert services.digest_sweep(now=later) == 0
    schedule.refresh_from_db()
    assert schedule.next_digest_scheduled == datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


def test_a_sweep_that_crashes_half_way_leaves_no_schedule_half_advanced(monkeypatch):
    owner = make_user("ada")
    recipient = make_recipient(owner)
    schedules = [_schedule(owner, recipient) for _ in range(3)]
    _note(owner, "note")
    real = services.notifications_queue

    def queue_then_crash(*args, **kwargs):
        real(*args, **kwargs)  # the digests are written...
        raise RuntimeError("worker died")  # ...and the process dies before the schedules move on

    monkeypatch.setattr(services, "notifications_queue", queue_then_crash)
    with pytest.raises(RuntimeError):
        services.digest_sweep(now=NOW)
    assert NotificationJob.objects.count() == 0  # every digest of the batch rolled back too
    for schedule in schedules:
        schedule.refresh_from_db()
        assert schedule.last_digest_sent is None and schedule.next_digest_scheduled <= NOW

    monkeypatch.setattr(services, "notifications_queue", real)
    assert services.digest_sweep(now=NOW) == 3


def test_two_workers_sweeping_at_the_same_moment_send_each_digest_once():
    owner = make_user("bea")
    recipients = [make_recipient(owner, email=f"r{i}@example.com") for i in range(300)]
    for recipient in recipients:
        services.recipient_digest_schedule_create(
            owner=owner,
            recipient=recipient,
            frequency="daily",
            delivery_time=time(0, 0),
            timezone="UTC",
            now=datetime(2026, 1, 1, tzinfo=UTC),
        )
    _note(owner, "news for everyone")
    digest_sweep_task.defer()
    digest_sweep_task.defer()  # two sweeps waiting: each worker takes one at the same moment
    workers = [start_worker_process("--queues", "digests", "--concurrency", "1") for _ in range(2)]
    try:
        wait_for(lambda: _succeeded_sweeps() >= 2, timeout=60, what="both sweeps")
    finally:
        for worker in workers:
            stop_worker(worker)
    per_recipient = NotificationJob.objects.filter(notification_type="digest").values_list("recipient_id", flat=True)
    assert sorted(per_recipient) == sorted(r.id for r in recipients)  # each exactly once


def _succeeded_sweeps() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'digests.sweep' AND status = 'succeeded'"
        )
        return cursor.fetchone()[0]


def _digest_bodies() -> list[str]:
    return list(
        NotificationJob.objects.filter(notification_type="digest")
        .order_by("id")
        .values_list("payload__body", flat=True)
    )


def test_a_note_committed_after_a_sweep_went_past_it_arrives_in_the_next_digest_exactly_once():
    """The slow note gets its id first but commits after a sweep has sent a newer note (an
    import batch in flight, a slow request): it must not be skipped, nor either sent twice."""
    owner = make_user("sly")
    _schedule(owner, make_recipient(owner))
    inserted, release = threading.Event(), threading.Event()

    def slow_request() -> None:  # its own connection, its own transaction, held open
        try:
            with transaction.atomic():
                _note(owner, "slow note")
                inserted.set()
                assert release.wait(30)
        finally:
            connection.close()

    slow = threading.Thread(target=slow_request)
    slow.start()
    try:
        assert inserted.wait(30)
        _note(owner, "fast note")
        services.digest_sweep(now=NOW)  # runs while the slow note is still uncommitted
    finally:
        release.set()
        slow.join(30)
    services.digest_sweep(now=NOW + timedelta(days=1))
    services.digest_sweep(now=NOW + timedelta(days=2))
    _note(owner, "later note")
    services.digest_sweep(now=NOW + timedelta(days=3))

    bodies = _digest_bodies()
    for title in ("slow note", "fast note", "later note"):
        assert sum(body.count(f"- {title}") for body in bodies) == 1, (title, bodies)
    # (Whether the sent-ahead rows are gone by now depends on every transaction of the cluster,
    # another test's included: the cursor passes them once the oldest open one has ended.)
