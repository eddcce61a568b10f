"""A job's run inside the worker (jobs/engine/worker.py's `_process_job`): what it costs per job
beside the task, and what it still logs. The worker runs in this process, on its own pool."""

from __future__ import annotations

import asyncio
import logging

import pytest
from procrastinate import jobs as procrastinate_jobs
from procrastinate.contrib.django import app

from jobs.tasking.defer import job_defer
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_status

pytestmark = pytest.mark.django_db(transaction=True)


def _run_worker_until_idle() -> None:
    async def scenario() -> None:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                await worker_app.run_worker_async(
                    queues=[tasks.QUEUE_A], concurrency=2, wait=False, install_signal_handlers=False
                )

    asyncio.run(scenario())


def test_with_info_off_a_job_formats_no_log_line_and_a_final_failure_is_still_logged(monkeypatch, caplog):
    # Upstream formats "Starting job <call string>" and "Job <call string> ended ..." for every
    # job, logged or not: the call string renders the job's arguments, a cost per job that buys
    # nothing with INFO off (production's level is WARNING).
    rendered: list[int] = []
    upstream_call_string = procrastinate_jobs.Job.call_string

    def counting(job):
        rendered.append(job.id)
        return upstream_call_string.func(job)  # a cached_property upstream

    monkeypatch.setattr(procrastinate_jobs.Job, "call_string", property(counting))
    caplog.set_level(logging.WARNING, logger="procrastinate")
    ok = [job_defer(tasks.echo, value=n) for n in range(3)]
    failed = job_defer(tasks.fail_permanently, reason="no such mailbox")

    _run_worker_until_idle()

    assert [job_status(job_id) for job_id in ok] == ["succeeded"] * 3
    assert job_status(failed) == "failed"
    assert [job_id for job_id in rendered if job_id in (*ok, failed)] == [failed]  # the line that is logged
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR and "ended with status" in r.getMessage()]
    assert "fail_permanently" in error.getMessage() and error.exc_info is not None


def test_a_result_is_written_with_the_jobs_end_not_by_a_statement_of_its_own(monkeypatch):
    # One round trip per job with a result (an e-mail returns "sent") was a tenth of the worker's
    # time: the result now goes in the batch of completions that ends the job.
    from procrastinate.psycopg_connector import PsycopgConnector

    from jobs.models import JobInfo

    statements: list[str] = []

    def spy(upstream):
        async def spied(self, query, **arguments):
            statements.append(query)
            return await upstream(self, query, **arguments)

        return spied

    for name in ("execute_query_async", "execute_query_one_async", "execute_query_all_async"):
        monkeypatch.setattr(PsycopgConnector, name, spy(getattr(PsycopgConnector, name)))
    jobs = [job_defer(tasks.echo, value=n) for n in range(3)]

    _run_worker_until_idle()

    assert [JobInfo.objects.get(job_id=job_id).result for job_id in jobs] == [{"echo": n} for n in range(3)]
    writes = [query for query in statements if "INSERT INTO jobs_job_info" in query]
    assert writes and all("finished AS" in query for query in writes), writes


def test_a_result_json_cannot_hold_is_stored_as_its_repr_and_its_batch_still_ends():
    # NaN is valid to Python's json but not to PostgreSQL's jsonb: one such result must not fail
    # the statement that writes its batch's ends (the jobs would stay `doing` and run again).
    from jobs.models import JobInfo

    odd = job_defer(tasks.returns_nan)
    plain = job_defer(tasks.echo, value=1)

    _run_worker_until_idle()

    assert [job_status(odd), job_status(plain)] == ["succeeded", "succeeded"]
    assert JobInfo.objects.get(job_id=odd).result == repr({"ratio": float("nan")})
    assert JobInfo.objects.get(job_id=plain).result == {"echo": 1}
