"""A worker declared dead while it still runs (stopped, cut off) and whose job was rescued and
taken by another worker: when it comes back and its run ends, its end must not be written over
the new run (issue 11, item 8)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from procrastinate.contrib.django import app

from jobs.console.services import jobs_retry_stalled
from jobs.models import JobInfo
from jobs.tasking.defer import job_defer
from tests.helpers import stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_status, query, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)

ENV = {"WORKER_HEARTBEAT_SECONDS": "0.5", "WORKER_STALLED_SECONDS": "2"}


def _rescue() -> dict:
    async def rescue() -> dict:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                return await jobs_retry_stalled(job_manager=worker_app.job_manager, seconds_since_heartbeat=1)

    return asyncio.run(rescue())


def _holder(job_id: int) -> int | None:
    return query("SELECT worker_id FROM procrastinate_jobs WHERE id = %s", [job_id])[0][0]


def test_a_stale_worker_does_not_finish_the_job_another_worker_now_runs(tmp_path):
    job_id = job_defer(tasks.run_per_attempt, dir_path=str(tmp_path))
    worker_a = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "1", env=ENV)
    worker_b = None
    try:
        wait_for(lambda: (tmp_path / "started-0").exists(), timeout=120, what="worker A to start run 0")
        worker_a.send_signal(signal.SIGSTOP)  # alive, but silent: its heartbeat goes stale
        wait_for(
            lambda: query("SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat < now() - interval '1.5 s'")[
                0
            ][0],
            timeout=30,
            what="worker A's heartbeat to go stale",
        )
        assert _rescue()["retried"] == [job_id]
        assert job_status(job_id) == "todo"

        worker_b = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "1", env=ENV)
        wait_for(lambda: (tmp_path / "started-1").exists(), timeout=120, what="worker B to start run 1")
        b_id = _holder(job_id)
        assert b_id is not None

        # A comes back and its run 0 ends while B's run 1 is still going.
        (tmp_path / "release-0").touch()
        worker_a.send_signal(signal.SIGCONT)
        wait_for(lambda: (tmp_path / "finished-0").exists(), timeout=30, what="worker A to end run 0")
        output_a = stop_worker(worker_a)  # a graceful stop writes every completion it holds

        assert job_status(job_id) == "doing", output_a
        assert _holder(job_id) == b_id
        assert not JobInfo.objects.filter(job_id=job_id, result__isnull=False).exists(), output_a
        assert "no longer held by this worker" in output_a

        (tmp_path / "release-1").touch()
        wait_for(lambda: job_status(job_id) != "doing", timeout=30, what="worker B to end run 1")
    finally:
        worker_a.send_signal(signal.SIGCONT)
        (tmp_path / "release-0").touch()
        (tmp_path / "release-1").touch()
        output_b = stop_worker(worker_b) if worker_b is not None else ""
        stop_worker(worker_a)

    assert job_status(job_id) == "succeeded", output_b
    assert JobInfo.objects.get(job_id=job_id).result == {"run": 1}
