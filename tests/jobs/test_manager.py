"""The job manager's public calls behave as Procrastinate documents them (jobs/engine/manager.py): a
direct `finish_job` is written before it returns and refuses what Procrastinate refuses. The
worker's own ends go through batches instead (tests/jobs/test_stale_worker.py)."""

from __future__ import annotations

import asyncio

import pytest
from procrastinate import exceptions
from procrastinate.contrib.django import app
from procrastinate.jobs import Status

from jobs.engine.manager import FINISH_JOBS
from jobs.tasking.defer import job_defer
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_attempts, job_status

pytestmark = pytest.mark.django_db(transaction=True)


def _with_claimed_job(action):
    """Claim the one waiting job as a registered worker, then `await action(manager, job)`."""

    async def run():
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                manager = worker_app.job_manager
                worker_id = await manager.register_worker()
                job = await manager.fetch_job(queues=None, worker_id=worker_id)
                assert job is not None
                return await action(manager, job)

    return asyncio.run(run())


def test_a_direct_finish_job_is_written_before_it_returns():
    job_id = job_defer(tasks.echo, value=1)

    async def finish(manager, job):
        await manager.finish_job(job=job, status=Status.SUCCEEDED, delete_job=False)
        # Read on another connection, before this event loop runs anything else.
        return await asyncio.to_thread(job_status, job_id)

    assert _with_claimed_job(finish) == "succeeded"
    assert job_attempts(job_id) == 1


@pytest.mark.parametrize("delete_job", [False, True])
def test_a_direct_finish_job_refuses_a_job_that_has_ended(delete_job):
    job_id = job_defer(tasks.echo, value=1)

    async def finish_twice(manager, job):
        await manager.finish_job(job=job, status=Status.FAILED, delete_job=False)
        with pytest.raises(exceptions.ConnectorException) as raised:
            await manager.finish_job(job=job, status=Status.FAILED, delete_job=delete_job)
        return str(raised.value.__cause__)

    assert 'not in "doing" or "todo" status' in _with_claimed_job(finish_twice)
    assert job_status(job_id) == "failed"


@pytest.mark.parametrize("delete_job", [False, True])
def test_a_direct_finish_job_refuses_todo_as_an_end(delete_job):
    job_id = job_defer(tasks.echo, value=1)

    async def finish_as_todo(manager, job):
        with pytest.raises(exceptions.ConnectorException) as raised:
            await manager.finish_job(job=job, status=Status.TODO, delete_job=delete_job)
        return str(raised.value.__cause__)

    assert 'End status should be either "succeeded", "failed" or "aborted"' in _with_claimed_job(finish_as_todo)
    assert job_status(job_id) == "doing"


def _end_three_jobs_a_millisecond_apart(*, lock: str | None = None) -> tuple[list[int], int]:
    """Claim three jobs as a worker and hand their ends to the batch 1 ms apart, as a worker does
    when they finish; then flush. Returns the jobs and how many statements wrote their ends."""
    ids = [job_defer(tasks.echo, value=n, lock=lock if n == 0 else None) for n in range(3)]

    async def run():
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                manager = worker_app.job_manager
                worker_id = await manager.register_worker()
                jobs = await manager.fetch_jobs(queues=None, worker_id=worker_id, limit=3)
                writes = 0
                execute = manager.connector.execute_query_all_async

                async def counting(query, **arguments):
                    nonlocal writes
                    writes += query is FINISH_JOBS
                    return await execute(query=query, **arguments)

                manager.connector.execute_query_all_async = counting
                await manager.flush_finished()  # a flush with nothing to write leaves no trace
                for job in jobs:
                    manager.finish_job_later(job, Status.SUCCEEDED, worker_id=worker_id, delete_job=False)
                    await asyncio.sleep(0.001)
                await manager.flush_finished()
                return writes

    return ids, asyncio.run(run())


def test_ends_a_millisecond_apart_share_one_statement(settings):
    # JOBS_COMPLETION_WINDOW_MS: the batch waits that long for more ends. Without it each end
    # that arrives while no batch is being written starts one (here: three statements).
    settings.JOBS_COMPLETION_WINDOW_MS = 500.0  # far longer than the 2 ms the ends take, on a busy machine too
    for _ in range(2):  # the app's one manager, in one event loop and then another
        ids, writes = _end_three_jobs_a_millisecond_apart()
        assert [job_status(job_id) for job_id in ids] == ["succeeded"] * 3
        assert writes == 1


def test_an_end_that_frees_a_lock_is_written_without_waiting_for_the_window(settings):
    settings.JOBS_COMPLETION_WINDOW_MS = 500.0
    ids, writes = _end_three_jobs_a_millisecond_apart(lock="one at a time")
    assert [job_status(job_id) for job_id in ids] == ["succeeded"] * 3
    assert writes >= 2  # the locked job's end went at once, the others after it
