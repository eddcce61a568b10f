"""A worker that stops answering while it holds a notification's row lock (a host that froze, a
process stopped with SIGSTOP, a dead host whose kernel no longer answers) does not keep the row
for hours: the server ends its session, another worker delivers the e-mail once, and the stopped
worker, resumed, sends no second copy. Real worker processes, PostgreSQL and SMTP on 127.0.0.1."""

from __future__ import annotations

import signal
import socket

import psycopg
import pytest
from django.db import connection

from notifications import services
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import database_url, smtp_env, start_worker_process, stop_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

HOLD_LOCK = 4242
# The commit point's UPDATE (which holds the row lock) waits on an advisory lock the test holds.
_HOLD_THE_COMMIT_POINT = f"""
CREATE FUNCTION hold_commit_point() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({HOLD_LOCK});
    RETURN NULL;
END $$;
CREATE TRIGGER hold_commit_point AFTER UPDATE ON notification_jobs
   FOR EACH ROW WHEN (NEW.status = 'sent') EXECUTE FUNCTION hold_commit_point();
"""
_RELEASE = """
DROP TRIGGER IF EXISTS hold_commit_point ON notification_jobs;
DROP FUNCTION IF EXISTS hold_commit_point();
"""
ENV = {
    "WORKER_HEARTBEAT_SECONDS": "0.5",
    "WORKER_STALLED_SECONDS": "2",
    "STALLED_JOBS_CRON": "* * * * * */1",
    "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": "3",
    "PROCRASTINATE_LOG_LEVEL": "INFO",
}


def _waiting_on_the_advisory_lock(conn: psycopg.Connection) -> bool:
    [[count]] = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        " AND query LIKE %s",
        ["%notification_jobs%"],
    ).fetchall()
    return count > 0


def test_a_stopped_worker_holding_the_row_lock_is_replaced_and_the_email_goes_once(smtp):
    owner = make_user("vic")
    notification = services.notification_send_email(
        owner=owner, recipient=make_recipient(owner), subject="Once", body="Hi", notification_type="system",
        priority="normal",
    )  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(_HOLD_THE_COMMIT_POINT)
    env = smtp_env(smtp, **ENV)
    stopped = rescuer = None
    outputs: list[str] = []
    try:
        with psycopg.connect(database_url(), autocommit=True) as blocker:
            blocker.execute("SELECT pg_advisory_lock(%s)", [HOLD_LOCK])
            stopped = start_worker_process("--queues", "notifications", env=env)
            wait_for(lambda: _waiting_on_the_advisory_lock(blocker), timeout=40, what="the commit point to wait")
            # The worker is inside its commit point, its UPDATE holding the row lock: freeze it,
            # then let its UPDATE finish. Its session now sits idle in its transaction.
            stopped.send_signal(signal.SIGSTOP)
            blocker.execute("SELECT pg_advisory_unlock(%s)", [HOLD_LOCK])
        rescuer = start_worker_process("--queues", "notifications,maintenance", env=env)
        wait_for(
            lambda: NotificationJob.objects.get(id=notification.id).status == "sent",
            timeout=60,
            what="another worker to deliver the notification",
        )
        # The row says sent once the commit point's COMMIT is in, just before the final dot
        # leaves: the sink may take a moment more to have the message.
        wait_for(lambda: smtp.notification_ids(), timeout=10, what="the e-mail at the sink")
        assert smtp.notification_ids() == [str(notification.id)]
        # Resumed, the stopped worker finds its session ended and writes no final dot.
        stopped.send_signal(signal.SIGCONT)
        outputs.append(stop_worker(stopped))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; sink: {smtp.notification_ids()}") from None
    finally:
        for process in (stopped, rescuer):
            if process is not None:
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                outputs.append(stop_worker(process))
        with connection.cursor() as cursor:
            cursor.execute(_RELEASE)
    assert smtp.notification_ids() == [str(notification.id)], outputs
    sent = NotificationJob.objects.get(id=notification.id)
    assert sent.status == "sent"
    assert smtp.messages[0]["Message-ID"] == sent.provider_message_id  # the rescuer's send


def test_database_sessions_have_keepalives_and_an_idle_in_transaction_timeout():
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN"
            " ('idle_in_transaction_session_timeout', 'tcp_keepalives_idle', 'tcp_keepalives_interval',"
            " 'tcp_keepalives_count') ORDER BY name"
        )
        server_side = dict(cursor.fetchall())
    assert server_side == {
        "idle_in_transaction_session_timeout": "20000",
        "tcp_keepalives_count": "3",
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
    }
    # And libpq's side: the client's own socket probes a server that went silent.
    sock = socket.socket(fileno=socket.dup(connection.connection.pgconn.socket))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        sock.close()  # the duplicate only
