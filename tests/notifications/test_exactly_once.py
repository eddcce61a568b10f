"""Exactly one e-mail per notification, with worker processes killed at the worst moments and
two workers sharing one rate limit. Real worker processes, PostgreSQL and SMTP on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess

import psycopg
import pytest

from notifications import selectors, services
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import database_url, smtp_env, start_worker_process, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

RESCUE = {"WORKER_HEARTBEAT_SECONDS": "0.5", "WORKER_STALLED_SECONDS": "2", "STALLED_JOBS_CRON": "* * * * * */1"}


def _send(owner, recipient, subject: str = "Hello") -> NotificationJob:
    return services.notification_send_email(
        owner=owner, recipient=recipient, subject=subject, body="Hi", notification_type="system", priority="normal"
    )


def _backend_waiting_on_a_lock(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    ).fetchone()
    return row[0] > 0


def _stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=20)[0]


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def test_worker_killed_in_the_middle_of_data_sends_nothing_and_the_rescue_sends_once(smtp):
    notification = _send(make_user("pat"), make_recipient(make_user("pat2")))
    smtp.rcpt_delay = 1.0
    env = smtp_env(smtp, **RESCUE)
    with psycopg.connect(database_url()) as blocker:
        doomed = start_worker_process("--queues", "notifications", env=env)
        try:
            wait_for(
                lambda: NotificationJob.objects.get(id=notification.id).status == "processing",
                what="the worker to claim the notification",
            )
            # Hold the row: the worker's commit point (just before the final dot) must wait.
            blocker.execute("SELECT 1 FROM notification_jobs WHERE id = %s FOR UPDATE", [notification.id])
            wait_for(lambda: _backend_waiting_on_a_lock(blocker), what="the worker to reach its commit point")
            _kill(doomed)
            # Its database session notices the dead client and gives up the pending UPDATE.
            wait_for(lambda: not _backend_waiting_on_a_lock(blocker), what="the dead worker's session to end")
        finally:
            if doomed.poll() is None:
                doomed.kill()
        blocker.rollback()
    assert smtp.messages == []  # the server discarded the unfinished message

    rescuer = start_worker_process("--queues", "notifications,maintenance", env=env)
    try:
        wait_for(lambda: len(smtp.messages) == 1, timeout=30, what="the rescued notification")
        wait_for(lambda: NotificationJob.objects.get(id=notification.id).status == "sent", what="status sent")
    finally:
        _stop(rescuer)
    assert len(smtp.messages) == 1
    assert smtp.messages[0]["Message-ID"] == NotificationJob.objects.get(id=notification.id).provider_message_id


def test_worker_killed_after_the_server_accepted_is_not_sent_again(smtp):
    notification = _send(make_user("quinn"), make_recipient(make_user("quinn2")))
    env = smtp_env(smtp, **RESCUE)
    with psycopg.connect(database_url()) as blocker:
        # Writing the delivery log, after the server said 250, will block: kill the worker there.
        blocker.execute("LOCK TABLE notification_delivery_logs IN ACCESS EXCLUSIVE MODE")
        doomed = start_worker_process("--queues", "notifications", env=env)
        try:
            wait_for(lambda: len(smtp.messages) == 1, what="the server to accept the message")
            wait_for(lambda: _backend_waiting_on_a_lock(blocker), what="the worker to block after sending")
            _kill(doomed)
            # Its backend notices the closed client (client_connection_check_interval) and
            # drops the waiting INSERT: the server's reply is not on record.
            wait_for(lambda: not _backend_waiting_on_a_lock(blocker), what="the dead worker's INSERT to go")
        finally:
            if doomed.poll() is None:
                doomed.kill()
        blocker.rollback()
    assert NotificationJob.objects.get(id=notification.id).status == "sent"  # recorded before the dot

    rescuer = start_worker_process("--queues", "notifications,maintenance", env=env)
    try:
        wait_for(
            lambda: (
                NotificationJob.objects.get(id=notification.id).procrastinate_job_id is not None
                and _job_status(notification) == "succeeded"
            ),
            timeout=30,
            what="the rescued job to finish",
        )
    finally:
        _stop(rescuer)
    assert len(smtp.messages) == 1
    # The operator sees it: sent, the server's reply never recorded (its Message-ID to look up).
    assert list(selectors.notifications_sent_unconfirmed().values_list("id", flat=True)) == [notification.id]


def _job_status(notification: NotificationJob) -> str:
    with psycopg.connect(database_url()) as conn:
        return conn.execute(
            "SELECT status FROM procrastinate_jobs WHERE id = %s", [notification.procrastinate_job_id]
        ).fetchone()[0]


def _registered_workers() -> int:
    with psycopg.connect(database_url()) as conn:
        return conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]


def test_two_workers_share_one_rate_limit_and_send_each_email_once(smtp, settings):
    settings.NOTIFICATIONS_BATCH_SIZE = 5  # 12 jobs: more than one worker's 4 slots
    owner = make_user("rosa")
    recipients = [make_recipient(owner, email=f"r{i}@example.com") for i in range(60)]
    env = smtp_env(smtp, NOTIFICATIONS_RATE_PER_SECOND="20", PROCRASTINATE_LOG_LEVEL="INFO")
    workers = [start_worker_process("--queues", "notifications", "--concurrency", "4", env=env) for _ in range(2)]
    try:
        # Both workers listening before the e-mails are queued: on a loaded machine one could
        # otherwise still be starting while the other sends them all.
        wait_for(lambda: _registered_workers() == 2, timeout=60, what="both workers to start")
        ids = services.notification_send_bulk(
            owner=owner, recipients=recipients, subject="Bulk", body="Hi", notification_type="system",
            priority="normal",
        )  # fmt: skip
        wait_for(lambda: len(smtp.messages) == 60, timeout=60, what="all 60 e-mails")
    finally:
        outputs = [_stop(w) for w in workers]
    assert sorted(int(i) for i in smtp.notification_ids()) == sorted(ids), outputs
    # 20 per second with a burst of 20: the last 40 take at least 2 s, whichever worker sends.
    # Two per-process limits would have taken about half of that.
    assert smtp.received_at[-1] - smtp.received_at[0] >= 1.8
    assert NotificationJob.objects.filter(id__in=ids, status="sent").count() == 60
    assert all("notifications.deliver" in output for output in outputs)  # both workers sent


def test_a_connection_reset_before_the_final_dot_leaves_the_worker_able_to_send(smtp):
    """The mail server resets the session after the message, before its final dot: the dot's
    write fails with the COMMIT's answer still unread. The e-mail is not lost (it goes again,
    once), and the worker's database connection stays usable for the next e-mail."""
    owner = make_user("sam")
    first = _send(owner, make_recipient(owner, email="first@example.com"), subject="First")
    smtp.rcpt_delay = 1.0
    env = smtp_env(smtp, PROCRASTINATE_LOG_LEVEL="INFO")
    worker = start_worker_process("--queues", "notifications", "--concurrency", "1", env=env)
    output = ""
    try:
        with psycopg.connect(database_url()) as blocker:
            wait_for(
                lambda: NotificationJob.objects.get(id=first.id).status == "processing",
                timeout=40,
                what="the worker to claim the notification",
            )
            # Hold the row: the worker has written the whole message and waits at its commit point.
            blocker.execute("SELECT 1 FROM notification_jobs WHERE id = %s FOR UPDATE", [first.id])
            wait_for(lambda: _backend_waiting_on_a_lock(blocker), what="the worker to reach its commit point")
            smtp.rcpt_delay = 0.0
            assert smtp.drop_connections() == 1
            blocker.rollback()  # the commit point goes on: COMMIT, then a dot into a reset socket
        second = _send(owner, make_recipient(owner, email="second@example.com"), subject="Second")
        wait_for(
            lambda: NotificationJob.objects.filter(id__in=[first.id, second.id], status="sent").count() == 2,
            timeout=30,
            what="both notifications sent",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; sink: {smtp.notification_ids()}; worker:\n{_stop(worker)}") from None
    finally:
        output = _stop(worker)
    assert sorted(smtp.notification_ids()) == sorted([str(first.id), str(second.id)]), output
    # The first went again after the reset; the second on its first attempt, on a clean connection.
    assert [log.outcome for log in NotificationJob.objects.get(id=first.id).delivery_logs.all()] == [
        "transient_failure",
        "sent",
    ]
    assert [log.outcome for log in NotificationJob.objects.get(id=second.id).delivery_logs.all()] == ["sent"]
    assert "another command is already in progress" not in output, output
