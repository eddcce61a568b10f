"""A worker killed with SIGKILL mid-job: its job is rescued and finished by another worker."""

from __future__ import annotations

import asyncio
import threading

import pytest
from django.db import connection
from procrastinate.contrib.django import app
from procrastinate.jobs import Status

from jobs.console.services import jobs_retry_stalled
from jobs.tasking import queues
from jobs.tasks import retry_stalled_jobs
from notes import services
from notes.models import Note
from tests.factories import make_user
from tests.helpers import jobs, kill_worker, run_worker, start_worker_process, stop_worker, wait_for
from tests.jobs.tasks_for_tests import QUEUE_A, echo

pytestmark = pytest.mark.django_db(transaction=True)


def test_job_of_a_sigkilled_worker_is_retried_and_completed_by_another_worker(claude):
    note = services.note_create(owner=make_user("dave"), content="survives a crash")
    release = threading.Event()
    claude.hang(release)  # the first worker's Claude call never returns
    env = {
        "ANTHROPIC_API_KEY": "sk-ant-test-key",
        "ANTHROPIC_BASE_URL": claude.base_url,
        "WORKER_HEARTBEAT_SECONDS": "0.5",
        "WORKER_STALLED_SECONDS": "2",
        "STALLED_JOBS_CRON": "* * * * * */1",  # every second
    }

    doomed = start_worker_process("--queues", "enrichment", env=env)
    try:
        assert claude.request_started.wait(30), "the first worker never called Claude"
        [job] = jobs("notes.enrich")
        assert job["status"] == "doing"
        kill_worker(doomed)
    finally:
        release.set()
        kill_worker(doomed)
    assert jobs("notes.enrich")[0]["status"] == "doing"  # nobody told the database

    rescuer = start_worker_process("--queues", "enrichment,maintenance", env=env)
    try:
        wait_for(
            lambda: Note.objects.get(id=note.id).enrichment_status == "done",
            timeout=30,
            what="the rescued job to complete",
        )
    finally:
        output = stop_worker(rescuer)
    [job] = jobs("notes.enrich")
    assert job["status"] == "succeeded", output
    assert job["attempts"] >= 1
    assert len(claude.message_requests) == 2
    assert any(j["status"] == "succeeded" for j in jobs("jobs.retry_stalled"))


def test_the_rescue_runs_before_a_backlog_of_urgent_jobs():
    """A worker claims the highest priority first: the rescue must not wait behind a backlog."""
    for value in range(5):
        echo.configure(priority=30).defer(value=value)  # as urgent as an urgent e-mail
    retry_stalled_jobs.defer(timestamp=0)

    run_worker(queues=[QUEUE_A, queues.MAINTENANCE], concurrency=1)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT j.task_name FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id"
            " WHERE e.type = 'started' ORDER BY e.id"
        )
        started = [row[0] for row in cursor.fetchall()]
    # (The worker's periodic deferrer may add rescues of its own, which jump the queue too.)
    assert started[0] == "jobs.retry_stalled"
    assert started.count("tests.echo") == 5


def test_the_rescue_skips_a_job_that_ended_since_it_was_listed_and_retries_the_others():
    ids = [echo.defer(value=value) for value in range(3)]
    with connection.cursor() as cursor:  # three jobs of a worker that is gone (its row deleted)
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = NULL WHERE id = ANY(%s)", [ids])

    class EndsOneMeanwhile(type(app.job_manager)):
        async def get_stalled_jobs(self, **kwargs):
            stalled = await super().get_stalled_jobs(**kwargs)
            # Its worker writes its end between the rescue's read and its retry.
            await self.connector.execute_query_async(
                "UPDATE procrastinate_jobs SET status = %(status)s WHERE id = %(id)s",
                status=Status.SUCCEEDED.value,
                id=ids[0],
            )
            return stalled

    async def rescue() -> dict[str, list]:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                manager = EndsOneMeanwhile(worker_app.connector)
                return await jobs_retry_stalled(job_manager=manager, seconds_since_heartbeat=30)

    report = asyncio.run(rescue())
    assert sorted(report["retried"]) == ids[1:]
    assert report["superseded"] == [] and report["skipped"] == []
    assert [job["status"] for job in jobs("tests.echo")] == ["succeeded", "todo", "todo"]
