"""A worker and the web outlive their primary: it crashes, its synchronous standby is promoted.

Both are given the two servers in one URL with target_session_attrs=read-write (config/
database_url.py) and nothing else: no restart, no new URL. `make failover` (bench/failover.py)
is the long version, under load, with the counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import BASE_DIR, smtp_env, stop_worker, wait_for
from tests.jobs.tasks_for_tests import QUEUE_A, WORKER_ENV, echo, stamp_a
from tests.peers.postgres import ThrowawayPostgres, sql
from tests.peers.smtp import SmtpSink
from tests.production_server import Server

FAST_HEARTBEAT = {"WORKER_HEARTBEAT_SECONDS": "0.5", "WORKER_STALLED_SECONDS": "30"}


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[ThrowawayPostgres, ThrowawayPostgres, str]]:
    """A migrated primary, its synchronous standby, and the URL that lists both."""
    with ThrowawayPostgres() as primary:
        primary.create_migrated_database("failover")
        standby = primary.make_standby()
        try:
            primary.make_synchronous(standby)
            url = (
                f"postgres://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/failover"
                "?target_session_attrs=read-write"
            )
            yield primary, standby, url
        finally:
            standby.destroy()


def _api_user(url: str) -> tuple[str, int]:
    """A user's API token and one of their recipients, made by the app itself."""
    script = (
        "from rest_framework.authtoken.models import Token; from tests.factories import make_recipient, make_user;"
        " u = make_user('failover'); print(Token.objects.create(user=u).key, make_recipient(u).id)"
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token, recipient_id = result.stdout.split()[-2:]  # after what `shell` prints of its own
    return token, int(recipient_id)


def _defer(url: str, task_name: str, **kwargs) -> int:
    [[ids]] = sql(
        url,
        "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(%s, %s, 0, NULL, NULL, %s::jsonb, NULL)"
        "::procrastinate_job_to_defer_v1])",
        [QUEUE_A, task_name, json.dumps(kwargs)],
    )
    return ids[0]


def _status(url: str, job_id: int) -> str:
    return sql(url, "SELECT status FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0]


def _send_email(server: Server, token: str, recipient_id: int, subject: str) -> int | None:
    """The notification id of a 202, or None for a 503 (the database away)."""
    status, body = server.request(
        "POST",
        "/api/notifications/send-email/",
        token=token,
        body={"recipient_id": recipient_id, "subject": subject, "body": "Hello"},
    )
    assert status in (202, 503), (status, body)
    return body["notification_id"] if status == 202 else None


def test_a_worker_and_the_web_carry_on_on_the_promoted_standby(primary_and_standby, tmp_path):
    primary, standby, url = primary_and_standby
    sink = SmtpSink().start()
    env = {"DATABASE_URL": url, **smtp_env(sink), **WORKER_ENV, **FAST_HEARTBEAT}
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "procrastinate", "worker", "--queues", f"{QUEUE_A},notifications"],
        cwd=BASE_DIR,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server: Server | None = None
    output = ""
    try:
        token, recipient_id = _api_user(primary.url("failover"))  # while the worker starts
        server = Server(tmp_path, env=env)
        before = _send_email(server, token, recipient_id, "before")
        wait_for(lambda: sink.notification_ids() == [str(before)], what="the first e-mail")
        # Runs through the failover, its end written on the new primary. Claims commit with
        # synchronous_commit=off (jobs/engine/manager.py): they do not wait for the standby, and
        # one lost with the primary only makes its job run again. Here it has reached the standby.
        running = _defer(url, stamp_a.name, n=1, sleep=2)
        wait_for(lambda: _status(standby.url("failover"), running) == "doing", what="the claim on the standby")

        primary.stop("immediate")
        standby.promote()

        after = wait_for(
            lambda: _send_email(server, token, recipient_id, "after"), timeout=20, what="a 202 from the new primary"
        )
        jobs = [_defer(url, echo.name, value=i) for i in range(3)]
        wait_for(
            lambda: all(_status(url, job_id) == "succeeded" for job_id in [running, *jobs]),
            timeout=30,
            what="the jobs to succeed on the new primary",
        )
        wait_for(lambda: sink.notification_ids() == [str(before), str(after)], what="the second e-mail")
        status, health = server.request("GET", "/api/health/")
        assert (status, health["database"]) == (200, "up"), health  # and a live worker's heartbeat
        assert worker.poll() is None, "the worker exited"
        [[starts]] = sql(
            url, "SELECT count(*) FROM procrastinate_events WHERE job_id = %s AND type = 'started'", [running]
        )
        assert starts == 1
        assert sql(standby.url("failover"), "SELECT status FROM notification_jobs ORDER BY id") == [
            ("sent",),
            ("sent",),
        ]
    finally:
        if server is not None:
            server.stop()
        sink.stop()
        output = stop_worker(worker)
        print(output)  # pytest shows it when the test fails
    assert worker.returncode == 0, output
