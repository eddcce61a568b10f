"""A job going back to its queue while a newer job of its queueing lock waits there.

Only one job of a queueing lock may wait (`todo`); another may run. Every path that puts a job
back (a worker's retry, the stalled-job rescue, a worker's re-queueing after an outage, an
operator's retry) used to meet the unique index: the job stayed `doing` for good, the rescue
stopped, the worker crashed, the API answered 500. Here each path runs with real workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from procrastinate.contrib.django import app

from jobs.console.services import jobs_retry_stalled
from jobs.models import JobInfo
from jobs.tasking import queues
from jobs.tasking.defer import job_defer
from jobs.tasks import retry_stalled_jobs
from notes import services as note_services
from notes.models import Note
from tests.factories import make_user
from tests.helpers import BASE_DIR, client_for, jobs, run_worker, start_worker_process, stop_worker, wait_for
from tests.jobs.tasks_for_tests import QUEUE_A, WORKER_ENV, echo, fail_permanently
from tests.jobs.test_dashboard import client_of, staff
from tests.jobs.workers import job_events, job_status, query
from tests.peers.postgres import ThrowawayPostgres, sql

pytestmark = pytest.mark.django_db(transaction=True)


def _info_error(job_id: int) -> str:
    info = JobInfo.objects.filter(job_id=job_id).first()
    return info.error if info else ""


# --- A worker's retry decision --------------------------------------------------------------
def test_an_enrichment_retried_while_its_note_was_edited_is_superseded_by_the_waiting_one(claude):
    """The exact sequence: J1 runs, the note is edited (J2 waits), Claude answers J1 with 529."""
    note = note_services.note_create(owner=make_user("erin"), content="version one")
    release = threading.Event()
    claude.hang(release, status=529)  # J1's call: held until the edit, then "overloaded"
    env = {"ANTHROPIC_API_KEY": "sk-ant-test-key", "ANTHROPIC_BASE_URL": claude.base_url}
    worker = start_worker_process("--queues", queues.ENRICHMENT, env=env)
    output = ""
    try:
        assert claude.request_started.wait(120), "the worker never called Claude"
        note_services.note_update(note=Note.objects.get(id=note.id), content="version two, the latest")
        first, second = (job["id"] for job in jobs("notes.enrich"))
        assert (job_status(first), job_status(second)) == ("doing", "todo")
        release.set()

        wait_for(
            lambda: (
                not query(
                    "SELECT 1 FROM procrastinate_jobs WHERE task_name = 'notes.enrich' AND status IN ('todo', 'doing')"
                )
            ),
            timeout=120,
            what="no enrichment left waiting or running",
        )
    finally:
        release.set()
        output = stop_worker(worker)
    assert job_status(first) == "cancelled", output
    assert job_events(first)[-1] == "cancelled"
    assert f"Superseded by job {second}" in _info_error(first)
    assert job_status(second) == "succeeded", output
    note.refresh_from_db()
    assert note.enrichment_status == "done"
    assert len(claude.message_requests) == 2
    assert "version two, the latest" in claude.message_requests[-1]["body"]["messages"][0]["content"]


# --- The stalled-job rescue -----------------------------------------------------------------
def test_the_rescue_supersedes_a_job_whose_queueing_lock_has_a_job_waiting_and_rescues_the_others():
    superseded = echo.configure(queueing_lock="report:7").defer(value="old")
    with_lock_free = [echo.defer(value=value) for value in range(3)]
    # A worker that is gone (its row deleted) held them; updated in id order, so the rescue
    # lists the conflicting job first.
    for job_id in (superseded, *with_lock_free):
        query("UPDATE procrastinate_jobs SET status = 'doing', worker_id = NULL WHERE id = %s", [job_id])
    waiting = echo.configure(queueing_lock="report:7").defer(value="new")
    rescue = retry_stalled_jobs.defer(timestamp=0)

    run_worker(queues=[queues.MAINTENANCE])

    assert job_status(rescue) == "succeeded"
    assert [job_status(job_id) for job_id in with_lock_free] == ["todo", "todo", "todo"]
    assert job_status(superseded) == "cancelled"
    assert f"Superseded by job {waiting}" in _info_error(superseded)
    assert job_status(waiting) == "todo"


def test_the_rescue_reports_each_job_as_retried_or_superseded():
    superseded = echo.configure(queueing_lock="report:8").defer(value="old")
    free = echo.defer(value="free")
    for job_id in (superseded, free):
        query("UPDATE procrastinate_jobs SET status = 'doing', worker_id = NULL WHERE id = %s", [job_id])
    waiting = echo.configure(queueing_lock="report:8").defer(value="new")

    async def rescue() -> dict[str, list]:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                return await jobs_retry_stalled(job_manager=worker_app.job_manager, seconds_since_heartbeat=30)

    report = asyncio.run(rescue())
    assert report == {
        "retried": [free],
        "superseded": [{"job_id": superseded, "by_job_id": waiting}],
        "skipped": [],
        "concurrency_fixed": [],  # the concurrency counts it reconciles (tests/jobs/test_concurrency.py)
    }


# --- Re-queueing after an outage ------------------------------------------------------------
@pytest.fixture(scope="module")
def own_postgres() -> Iterator[tuple[ThrowawayPostgres, str]]:
    """A PostgreSQL server of this module's own, migrated, that the test may restart."""
    with ThrowawayPostgres() as pg:
        yield pg, pg.create_migrated_database("requeue")


def test_after_an_outage_a_lost_job_whose_queueing_lock_has_a_job_waiting_is_superseded(own_postgres):
    pg, url = own_postgres
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "procrastinate", "worker", "--queues", QUEUE_A],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": url, **WORKER_ENV, "WORKER_HEARTBEAT_SECONDS": "0.5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = ""
    try:
        wait_for(
            lambda: sql(url, "SELECT count(*) FROM procrastinate_workers")[0][0] == 1, timeout=120, what="the worker"
        )
        [[worker_id]] = sql(url, "SELECT id FROM procrastinate_workers")
        # Claims that committed but whose answers never reached the worker: `doing` under its
        # id. The first one's note was edited meanwhile: its next run waits behind its lock.
        insert = (
            "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args, status, worker_id)"
            " VALUES (%s, %s, %s, %s, %s, 'doing', %s) RETURNING id"
        )
        [[lost_locked]] = sql(url, insert, [QUEUE_A, echo.name, "note:1", "enrich:1", '{"value": 1}', worker_id])
        [[lost_free]] = sql(url, insert, [QUEUE_A, echo.name, None, None, '{"value": 2}', worker_id])
        [[ids]] = sql(
            url,
            "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(%s, %s, 0, 'note:1', 'enrich:1', %s::jsonb, NULL)"
            "::procrastinate_job_to_defer_v1])",
            [QUEUE_A, echo.name, json.dumps({"value": 3})],
        )
        waiting = ids[0]

        pg.restart(down_seconds=2)

        def status(job_id: int) -> str:
            return sql(url, "SELECT status FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0]

        wait_for(
            lambda: status(lost_free) == "succeeded" and status(waiting) == "succeeded",
            timeout=120,
            what="the lost job and the waiting one to succeed",
        )
        assert worker.poll() is None, "the worker exited"
        assert status(lost_locked) == "cancelled"
        [[error]] = sql(url, "SELECT error FROM jobs_job_info WHERE job_id = %s", [lost_locked])
        assert f"Superseded by job {waiting}" in error
    finally:
        output = stop_worker(worker)
    assert worker.returncode == 0, output
    assert f"Job {lost_locked}, which this worker lost track of, is superseded by job {waiting}" in output


# --- An operator's retry: the API, the dashboard, the admin -------------------------------
def _failed_job(owner_id: int | None = None, *, queueing_lock: str | None = None) -> int:
    job_id = job_defer(fail_permanently, owner_id=owner_id, queueing_lock=queueing_lock, reason="boom")
    run_worker(queues=[QUEUE_A])
    assert job_status(job_id) == "failed"
    return job_id


def test_the_api_refuses_a_retry_while_a_job_of_its_queueing_lock_waits_409():
    owner = make_user("frank")
    api = client_for(owner)
    failed = _failed_job(owner.id, queueing_lock="export:9")
    waiting = job_defer(echo, owner_id=owner.id, queueing_lock="export:9", value="newer")

    refused = api.post(f"/api/jobs/{failed}/retry/")
    assert refused.status_code == 409
    assert refused.json()["waiting_job_id"] == waiting
    assert f"Job {waiting} is already waiting with the same queueing lock (export:9)" in refused.json()["detail"]
    assert (job_status(failed), job_status(waiting)) == ("failed", "todo")

    run_worker(queues=[QUEUE_A])  # the waiting job runs: the lock is free again
    assert job_status(waiting) == "succeeded"
    assert api.post(f"/api/jobs/{failed}/retry/").status_code == 202
    assert job_status(failed) == "todo"


def test_the_dashboard_retries_each_failed_job_on_its_own_and_says_which_it_skipped_and_why():
    operator = client_of(staff("operator", "retry_job"))
    locked = _failed_job(queueing_lock="export:9")
    free = _failed_job()
    waiting = job_defer(echo, queueing_lock="export:9", value="newer")
    url = "/admin/jobs/dashboard/retry-failed/"

    answer = operator.post(url, {"task": fail_permanently.name}, content_type="application/json")
    assert answer.status_code == 200
    body = answer.json()
    assert (body["retried"], body["skipped"]) == (1, 1)
    [skipped] = body["skipped_jobs"]
    assert (skipped["job_id"], skipped["waiting_job_id"]) == (locked, waiting)
    assert f"Job {waiting} is already waiting" in skipped["reason"]
    assert (job_status(free), job_status(locked)) == ("todo", "failed")

    # Only the conflicting one is left: nothing can be retried, 409 with the reason.
    refused = operator.post(url, {"task": fail_permanently.name}, content_type="application/json")
    assert refused.status_code == 409
    assert f"Job {waiting} is already waiting" in refused.json()["detail"]
    assert job_status(locked) == "failed"


def test_the_admin_retry_action_skips_a_job_whose_queueing_lock_has_a_job_waiting_and_retries_the_others():
    root = client_of(staff("root", superuser=True))
    locked = _failed_job(queueing_lock="export:9")
    free = _failed_job()
    waiting = job_defer(echo, queueing_lock="export:9", value="newer")

    response = root.post(
        "/admin/procrastinate/procrastinatejob/",
        {"action": "retry", "_selected_action": [locked, free]},
        follow=True,
    )
    assert response.status_code == 200
    shown = [str(message) for message in response.context["messages"]]
    assert any(f"Job {locked} not retried: Job {waiting} is already waiting" in m for m in shown), shown
    assert "Retried 1 job(s)." in shown
    assert (job_status(free), job_status(locked), job_status(waiting)) == ("todo", "failed", "todo")
