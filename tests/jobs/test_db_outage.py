"""A worker process outlives a database outage and puts its state right afterwards.

The restart test runs against a throw-away PostgreSQL that it owns (tests/peers/postgres.py):
stopping the suite's own server would take every other test down with it. The other runs on
the test database: a worker whose row another worker pruned (what happens when an outage
outlasts the stalled-worker timeout) registers again and keeps its running job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import BASE_DIR, stop_worker, wait_for
from tests.jobs.tasks_for_tests import QUEUE_A, WORKER_ENV, echo, stamp_a
from tests.jobs.workers import job_events, query, start_test_worker, wait_for_workers
from tests.peers.postgres import ThrowawayPostgres, sql

FAST_HEARTBEAT = {"WORKER_HEARTBEAT_SECONDS": "0.5", "WORKER_STALLED_SECONDS": "30"}


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[tuple[ThrowawayPostgres, str]]:
    """A PostgreSQL server of this module's own, migrated, that the tests may restart."""
    with ThrowawayPostgres() as pg:
        yield pg, pg.create_migrated_database("outage")


def _defer(url: str, task_name: str, *, scheduled_in_hours: int | None = None, **kwargs) -> int:
    [[ids]] = sql(
        url,
        "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(%s, %s, 0, NULL, NULL, %s::jsonb,"
        " now() + make_interval(hours => %s))::procrastinate_job_to_defer_v1])",
        [QUEUE_A, task_name, json.dumps(kwargs), scheduled_in_hours],
    )
    return ids[0]


def _status(url: str, job_id: int) -> str:
    return sql(url, "SELECT status FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0]


def test_a_worker_keeps_working_through_a_postgresql_restart(own_postgres):
    pg, url = own_postgres
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "procrastinate", "worker", "--queues", QUEUE_A, "--concurrency", "4"],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": url, **WORKER_ENV, **FAST_HEARTBEAT},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = ""
    try:
        wait_for(lambda: sql(url, "SELECT count(*) FROM procrastinate_workers")[0][0] == 1, what="the worker")
        [[worker_id]] = sql(url, "SELECT id FROM procrastinate_workers")
        # Runs through the outage and ends while the database is down: its end waits in memory.
        running = _defer(url, stamp_a.name, n=1, sleep=2)
        wait_for(lambda: _status(url, running) == "doing", what="the long job to start")
        # A claim that committed but whose answer never reached the worker: `doing` under its id.
        lost = _defer(url, echo.name, scheduled_in_hours=1, value="lost")
        sql(url, "UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s WHERE id = %s", [worker_id, lost])

        pg.restart(down_seconds=4)

        after = [_defer(url, echo.name, value=i) for i in range(5)]
        wait_for(
            lambda: all(_status(url, job_id) == "succeeded" for job_id in [running, *after]),
            timeout=30,
            what="the jobs to succeed after the restart",
        )
        assert worker.poll() is None, "the worker exited"
        [[starts, attempts]] = sql(
            url,
            "SELECT (SELECT count(*) FROM procrastinate_events WHERE job_id = %(id)s AND type = 'started'),"
            " (SELECT attempts FROM procrastinate_jobs WHERE id = %(id)s)",
            {"id": running},
        )
        assert (starts, attempts) == (1, 1)  # ran once; its end was written once the server was back
        # The lost claim went back to the queue (it is scheduled for later, so it waits there).
        wait_for(lambda: _status(url, lost) == "todo", timeout=10, what="the lost claim to be re-queued")
    finally:
        output = stop_worker(worker)
    assert worker.returncode == 0, output
    assert "The database is back" in output
    assert "Re-queued 1 job(s) this worker lost track of" in output


@pytest.mark.django_db(transaction=True)
def test_a_worker_whose_row_was_pruned_registers_again_and_keeps_its_running_job():
    worker = start_test_worker("--queues", QUEUE_A, env=FAST_HEARTBEAT)
    try:
        wait_for_workers(1)
        [[old_id]] = query("SELECT id FROM procrastinate_workers")
        job_id = stamp_a.defer(n=1, sleep=3)
        wait_for(lambda: query("SELECT status FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0] == "doing")
        # What another worker's start-up does to a worker whose heartbeat went stale.
        query("DELETE FROM procrastinate_workers WHERE id = %s", [old_id])
        assert query("SELECT worker_id FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0] is None

        wait_for(lambda: query("SELECT count(*) FROM procrastinate_workers")[0][0] == 1, what="a new worker row")
        [[new_id]] = query("SELECT id FROM procrastinate_workers")
        assert new_id != old_id
        # Its running job is its own again (the statement right after the registration), so the
        # stalled-job rescue leaves it alone.
        wait_for(
            lambda: query("SELECT worker_id FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0] == new_id,
            what="the running job taken back by the new worker row",
        )

        after = echo.defer(value="after")
        wait_for(
            lambda: query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")[0][0] == 2,
            timeout=20,
            what="both jobs to succeed",
        )
        assert job_events(job_id).count("started") == 1
        assert job_events(after) == ["deferred", "started", "succeeded"]
    finally:
        output = stop_worker(worker)
    assert "Registered again as worker" in output, output
