"""Pausing a queue (jobs/engine/manager.py's fetch, services.queue_pause/queue_resume, the jobs_queue
command): its jobs wait while other queues run, in every worker process; resuming wakes idle
workers through NOTIFY."""

from __future__ import annotations

import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from core.errors import ApplicationError
from jobs.console import services
from jobs.models import PausedQueue
from jobs.tasking.defer import job_defer, job_defer_bulk
from tests.factories import make_user
from tests.helpers import stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_events, query, start_test_worker, wait_for_listeners, wait_for_workers

pytestmark = pytest.mark.django_db(transaction=True)


def _statuses(task_name: str) -> list[str]:
    return [row[0] for row in query("SELECT status FROM procrastinate_jobs WHERE task_name = %s", [task_name])]


def test_a_paused_queue_waits_in_every_worker_while_the_other_runs_and_resume_wakes_them():
    services.queue_pause(queue=tasks.QUEUE_A, by=make_user("ops"))
    # Both workers take both queues, one job at a time (0.3 s each), so both get work. They
    # poll only every 60 s: once idle, only a NOTIFY (a new job, the resume) wakes them here.
    args = ("--queues", f"{tasks.QUEUE_A},{tasks.QUEUE_B}", "--concurrency", "1", "--fetch-job-polling-interval", "60")
    workers = [start_test_worker(*args) for _ in range(2)]
    try:
        wait_for_workers(2)
        wait_for_listeners(2)
        a_jobs = job_defer_bulk(tasks.stamp_a, [{"n": n, "sleep": 0.3} for n in range(4)])
        job_defer_bulk(tasks.stamp_b, [{"n": n, "sleep": 0.3} for n in range(4)])

        wait_for(lambda: _statuses("tests.stamp_b") == ["succeeded"] * 4, what="queue B to run")
        time.sleep(1.0)  # time enough for any worker to have taken an A job, were it allowed
        assert _statuses("tests.stamp_a") == ["todo"] * 4
        assert all(job_events(job_id) == ["deferred"] for job_id in a_jobs)

        resumed_at = time.monotonic()
        services.queue_resume(queue=tasks.QUEUE_A)
        wait_for(lambda: _statuses("tests.stamp_a") == ["succeeded"] * 4, timeout=20, what="queue A after resume")
        woke_after = time.monotonic() - resumed_at
        ran_on = query(
            "SELECT task_name, count(DISTINCT worker_id) FROM procrastinate_jobs"
            " WHERE task_name LIKE 'tests.%%' GROUP BY task_name"
        )
    finally:
        outputs = [stop_worker(worker) for worker in workers]

    assert woke_after < 20, outputs  # far below the 60 s poll: the NOTIFY woke them
    # Both processes ran B's jobs while A was paused, and both were woken for A's.
    assert sorted(ran_on) == [("tests.stamp_a", 2), ("tests.stamp_b", 2)], outputs


def test_a_running_job_finishes_when_its_queue_is_paused(tmp_path):
    go = tmp_path / "go"
    running = job_defer(tasks.wait_then_finish, go_path=str(go))
    worker = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "2")
    try:
        wait_for(lambda: _statuses("tests.wait_then_finish") == ["doing"], what="the job to start")
        services.queue_pause(queue=tasks.QUEUE_A)
        waiting = job_defer(tasks.stamp_a, n=1)
        go.touch()
        wait_for(lambda: _statuses("tests.wait_then_finish") == ["succeeded"], what="the running job to finish")
        time.sleep(0.5)
        assert _statuses("tests.stamp_a") == ["todo"]
    finally:
        output = stop_worker(worker)
    assert job_events(running)[-1] == "succeeded", output
    assert job_events(waiting) == ["deferred"]


def test_pause_is_idempotent_and_an_unknown_queue_is_a_field_error():
    first = services.queue_pause(queue=tasks.QUEUE_A)
    again = services.queue_pause(queue=tasks.QUEUE_A)
    assert again.paused_at == first.paused_at
    assert PausedQueue.objects.count() == 1
    services.queue_resume(queue=tasks.QUEUE_A)
    services.queue_resume(queue=tasks.QUEUE_A)  # resuming a running queue is fine
    assert PausedQueue.objects.count() == 0

    for call in (services.queue_pause, services.queue_resume):
        with pytest.raises(ApplicationError) as refused:
            call(queue="no-such-queue")
        assert refused.value.status_code == 400
        assert list(refused.value.extra) == ["queue"]


def _command(*args: str) -> str:
    out = StringIO()
    call_command("jobs_queue", *args, stdout=out)
    return out.getvalue()


def test_the_management_command_pauses_lists_and_resumes():
    job_defer_bulk(tasks.stamp_a, [{"n": 1}, {"n": 2}])

    assert _command("pause", tasks.QUEUE_A).startswith(f"Paused {tasks.QUEUE_A} (since ")
    assert PausedQueue.objects.filter(queue_name=tasks.QUEUE_A, paused_by=None).exists()

    listing = {line.split()[0]: line.split()[1:] for line in _command("list").splitlines()[1:]}
    assert listing[tasks.QUEUE_A][:4] == ["paused", "2", "0", "0"]
    assert listing[tasks.QUEUE_B][:4] == ["running", "0", "0", "0"]
    assert set(listing) >= {"enrichment", "notifications", "digests", "imports", "maintenance"}

    assert _command("resume", tasks.QUEUE_A) == f"Resumed {tasks.QUEUE_A}.\n"
    assert not PausedQueue.objects.exists()
    listing = {line.split()[0]: line.split()[1:] for line in _command("list").splitlines()[1:]}
    assert listing[tasks.QUEUE_A][0] == "running"


def test_the_management_command_refuses_an_unknown_queue():
    with pytest.raises(CommandError, match=r"Unknown queue\. queue: Must be one of"):
        _command("pause", "no-such-queue")
    assert not PausedQueue.objects.exists()
