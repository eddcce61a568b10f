"""A bulk send's e-mails delivered many to a job (notifications.deliver_many): real workers on
PostgreSQL, a real SMTP server on 127.0.0.1. Each e-mail still goes once, fails on its own and
gets the attempts it would get alone."""

from __future__ import annotations

import pytest
from django.db import connection
from django.utils import timezone

from notifications import services
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import jobs, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def owner(transactional_db):
    return make_user("bulk-owner")


def send_bulk(owner, count: int) -> list[int]:
    recipients = [make_recipient(owner, email=f"r{i}@example.com") for i in range(count)]
    return services.notification_send_bulk(
        owner=owner, recipients=recipients, subject="News", body="Hello", notification_type="system",
        priority="normal",
    )  # fmt: skip


def job_results() -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT info.result FROM procrastinate_jobs AS job JOIN jobs_job_info AS info ON info.job_id = job.id"
            " WHERE job.task_name = 'notifications.deliver_many' ORDER BY job.id"
        )
        return [row[0] if isinstance(row[0], dict) else __import__("json").loads(row[0]) for row in cursor.fetchall()]


def test_a_bulk_send_goes_in_jobs_of_the_batch_size_each_email_once(owner, smtp, settings):
    settings.NOTIFICATIONS_BATCH_SIZE = 20
    ids = send_bulk(owner, 45)
    runs = [job["args"]["notification_ids"] for job in jobs("notifications.deliver_many")]
    assert runs == [ids[:20], ids[20:40], ids[40:]]  # in order, one owner's run each
    run_worker(concurrency=2)
    assert sorted(int(i) for i in smtp.notification_ids()) == sorted(ids)  # each once
    sent = NotificationJob.objects.filter(id__in=ids, status="sent")
    assert sent.count() == 45 and {n.retry_count for n in sent} == {1}
    for notification in sent:
        [log] = notification.delivery_logs.all()
        assert log.outcome == "sent" and log.attempt == 1
    assert [job["status"] for job in jobs("notifications.deliver_many")] == ["succeeded"] * 3
    assert job_results() == [{"sent": 20}, {"sent": 20}, {"sent": 5}]


def test_runs_never_mix_owners_and_a_run_of_one_is_a_plain_job(transactional_db, settings):
    settings.NOTIFICATIONS_BATCH_SIZE = 2
    ann, bob = make_user("ann"), make_user("bob")
    to_ann, to_bob = make_recipient(ann), make_recipient(bob)
    emails = [
        services.QueuedEmail(owner_id=owner.pk, recipient_id=recipient.pk, subject="S", body="B")
        for owner, recipient in ((ann, to_ann), (bob, to_bob), (ann, to_ann), (ann, to_ann))
    ]
    a1, b1, a2, a3 = services.notifications_queue(emails, notification_type="digest", priority="normal")
    (many,) = jobs("notifications.deliver_many")
    plain = {job["args"]["notification_id"]: job["id"] for job in jobs("notifications.deliver")}
    assert many["args"]["notification_ids"] == [a1, a2] and set(plain) == {b1, a3}
    linked = dict(NotificationJob.objects.values_list("id", "procrastinate_job_id"))
    assert linked == {a1: many["id"], a2: many["id"], b1: plain[b1], a3: plain[a3]}
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, owner_id FROM procrastinate_jobs")
        owners = dict(cursor.fetchall())
    assert owners == {many["id"]: ann.pk, plain[b1]: bob.pk, plain[a3]: ann.pk}  # fair claims see the owner


def test_a_transient_failure_hands_that_email_to_its_own_job_counting_on_its_attempts(owner, smtp, settings):
    settings.NOTIFICATIONS_BATCH_SIZE = 3
    first, failing, last = send_bulk(owner, 3)
    # The second DATA of the session is refused; the first and third go through.
    original = smtp.handle_DATA
    calls = []

    async def refuse_second(server, session, envelope):
        calls.append(1)
        if len(calls) == 2:
            return "451 4.3.0 Try again later"
        return await original(server, session, envelope)

    smtp.handle_DATA = refuse_second
    run_worker()
    assert sorted(int(i) for i in smtp.notification_ids()) == [first, last]
    [many] = jobs("notifications.deliver_many")
    assert many["status"] == "succeeded" and job_results() == [{"sent": 2, "retrying": 1}]
    notification = NotificationJob.objects.get(id=failing)
    assert notification.status == "pending" and "451" in notification.error
    [own] = jobs("notifications.deliver")
    assert own["args"] == {"notification_id": failing} and own["status"] == "todo"
    assert own["attempts"] == 1 and notification.procrastinate_job_id == own["id"]
    wait = (own["scheduled_at"] - timezone.now()).total_seconds()
    assert 0.5 < wait <= 2.5  # notifications.deliver's first back-off, 2 s

    # Two more refusals: the attempts run out at the third, as for an e-mail queued alone.
    calls.clear()
    smtp.handle_DATA = lambda server, session, envelope: _async("451 4.3.0 Still busy")
    for _ in range(3):
        with connection.cursor() as cursor:
            cursor.execute("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo'")
        run_worker()
    notification.refresh_from_db()
    assert notification.status == "failed" and notification.retry_count == 3
    assert [(log.attempt, log.outcome) for log in notification.delivery_logs.order_by("id")] == [
        (1, "transient_failure"),
        (2, "transient_failure"),
        (3, "transient_failure"),
    ]
    assert [job["status"] for job in jobs("notifications.deliver")] == ["failed"]


async def _async(value):
    return value


def test_cancelling_one_email_of_a_waiting_job_leaves_the_others_to_it(owner, smtp, settings):
    settings.NOTIFICATIONS_BATCH_SIZE = 3
    ids = send_bulk(owner, 3)
    services.notification_cancel(notification=NotificationJob.objects.get(id=ids[1]))
    [many] = jobs("notifications.deliver_many")
    assert many["status"] == "todo"  # still there for the other two
    run_worker()
    assert sorted(int(i) for i in smtp.notification_ids()) == [ids[0], ids[2]]
    assert NotificationJob.objects.get(id=ids[1]).status == "cancelled"
    assert job_results() == [{"sent": 2, "cancelled": 1}]


def test_a_rerun_of_the_job_sends_only_what_is_not_sent(owner, smtp, settings):
    """A worker killed mid-run: its job runs again, and the e-mails already sent stay sent once."""
    settings.NOTIFICATIONS_BATCH_SIZE = 4
    ids = send_bulk(owner, 4)
    run_worker()
    assert len(smtp.messages) == 4
    NotificationJob.objects.filter(id__in=ids[2:]).update(status="pending")  # as if never reached
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'todo' WHERE task_name = 'notifications.deliver_many'")
    run_worker()
    assert sorted(int(i) for i in smtp.notification_ids()) == sorted(ids + ids[2:])
    assert NotificationJob.objects.filter(id__in=ids, status="sent").count() == 4
