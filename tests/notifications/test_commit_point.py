"""The commit point before the final dot: durable whatever the database's defaults, and a send
whose COMMIT's answer was lost is never sent again, however long the database stays away.

The outage test runs a worker process against a throw-away PostgreSQL it may crash
(tests/peers/postgres.py), with the SMTP sink on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from notifications import services
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import BASE_DIR, smtp_env, stop_worker, wait_for
from tests.peers.postgres import ThrowawayPostgres, sql

# Records the synchronous_commit in force when the commit point's UPDATE runs, in its transaction.
_RECORD_SYNCHRONOUS_COMMIT = """
CREATE TABLE commit_point_settings (notification_id bigint, synchronous_commit text);
CREATE FUNCTION record_synchronous_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO commit_point_settings VALUES (NEW.id, current_setting('synchronous_commit'));
    RETURN NEW;
END $$;
CREATE TRIGGER record_synchronous_commit AFTER UPDATE ON notification_jobs
   FOR EACH ROW WHEN (NEW.status = 'sent') EXECUTE FUNCTION record_synchronous_commit();
"""
_DROP_RECORDING = """
DROP TRIGGER IF EXISTS record_synchronous_commit ON notification_jobs;
DROP FUNCTION IF EXISTS record_synchronous_commit();
DROP TABLE IF EXISTS commit_point_settings;
"""


@pytest.mark.django_db(transaction=True)
def test_the_commit_point_commits_synchronously_when_the_database_default_is_off(smtp):
    owner = make_user("tess")
    notification = services.notification_send_email(
        owner=owner, recipient=make_recipient(owner), subject="Hi", body="Hi", notification_type="system",
        priority="normal",
    )  # fmt: skip
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        cursor.execute(_RECORD_SYNCHRONOUS_COMMIT)
        cursor.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    try:
        connection.close()  # a new session, with the database's default
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == "off"
        with CaptureQueriesContext(connection) as queries:
            assert services.notification_deliver(notification_id=notification.id, attempt=1) == "sent"
        # The UPDATE sets it itself: no statement (and round trip) of its own before it.
        assert not [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SET ")]
        with connection.cursor() as cursor:
            cursor.execute("SELECT synchronous_commit FROM commit_point_settings")
            assert cursor.fetchall() == [("on",)]
            cursor.execute("SHOW synchronous_commit")  # only the commit point's transaction
            assert cursor.fetchone()[0] == "off"
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{name}" RESET synchronous_commit')
            cursor.execute(_DROP_RECORDING)
        connection.close()
    assert len(smtp.messages) == 1
    assert NotificationJob.objects.get(id=notification.id).status == "sent"


# The commit point's COMMIT hangs (a deferred trigger) until the test crashes the server: the
# dot has left, the COMMIT never commits. Only on the server that was running when it was made.
_HOLD_THE_COMMIT = """
CREATE TABLE hold_commit_on AS SELECT pg_postmaster_start_time() AS started;
CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM hold_commit_on WHERE started = pg_postmaster_start_time()) THEN
        PERFORM pg_sleep(120);
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER hold_commit AFTER UPDATE ON notification_jobs DEFERRABLE INITIALLY DEFERRED
   FOR EACH ROW WHEN (NEW.status = 'sent') EXECUTE FUNCTION hold_commit();
"""

_QUEUE_ONE = """
from notifications import services
from tests.factories import make_recipient, make_user
owner = make_user("uma")
n = services.notification_send_email(owner=owner, recipient=make_recipient(owner), subject="Once", body="Hi",
                                     notification_type="system", priority="normal")
print(n.id)
"""


@pytest.fixture
def own_postgres() -> Iterator[tuple[ThrowawayPostgres, str]]:
    with ThrowawayPostgres() as pg:
        yield pg, pg.create_migrated_database("commit_point")


def test_a_lost_commit_and_a_long_outage_never_send_a_second_email(own_postgres, smtp):
    pg, url = own_postgres
    env = {**os.environ, "DATABASE_URL": url}
    queued = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", _QUEUE_ONE], cwd=BASE_DIR, env=env, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    notification_id = int(queued.stdout.strip().splitlines()[-1])
    sql(url, _HOLD_THE_COMMIT)
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "procrastinate", "worker", "--queues", "notifications", "--concurrency", "2"],
        cwd=BASE_DIR,
        env={**env, **smtp_env(smtp, NOTIFICATIONS_OUTCOME_WAIT_SECONDS="1", PROCRASTINATE_LOG_LEVEL="INFO")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = ""
    try:
        # The dot went out right after the COMMIT; the server keeps the message.
        wait_for(lambda: len(smtp.messages) == 1, timeout=40, what="the e-mail at the sink")
        # A crash before the COMMIT commits, and the database away for longer than the worker
        # waits in its job.
        pg.stop("immediate")
        pg.restart(down_seconds=5)
        wait_for(
            lambda: sql(url, "SELECT status FROM notification_jobs WHERE id = %s", [notification_id]) == [("sent",)],
            timeout=30,
            what="the send to be recorded",
        )
        # Long enough for a retry (2 s) to have run and sent again.
        wait_for(
            lambda: (
                sql(
                    url,
                    "SELECT count(*) FROM procrastinate_jobs"
                    " WHERE task_name = 'notifications.deliver' AND status IN ('todo', 'doing')",
                )
                == [(0,)]
            ),
            timeout=30,
            what="the job to end",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; sink: {smtp.notification_ids()}; worker:\n{stop_worker(worker)}") from None
    finally:
        output = stop_worker(worker)
    assert smtp.notification_ids() == [str(notification_id)], output
    assert worker.returncode == 0, output
    # The crash lost the COMMIT: the worker, which knew the dot had left, recorded the send.
    logs = sql(url, "SELECT outcome, provider_response FROM notification_delivery_logs WHERE notification_id = %s",
                [notification_id])  # fmt: skip
    assert logs == [("sent", "sent; recorded after a database outage")], output
