"""Claiming ahead (jobs/engine/worker.py, JOBS_CLAIM_AHEAD_MS): while its jobs are short, a
worker claims its next jobs while every slot is still busy, holds them `doing`, starts them as
slots free, and hands back those that never started when it stops. The worker runs in this
process, on its own pool."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from procrastinate.contrib.django import app

from jobs.engine.worker import BatchingWorker
from jobs.models import JobInfo
from jobs.tasking.defer import job_defer
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_events, job_status, query

pytestmark = pytest.mark.django_db(transaction=True)


def _spy_claims(monkeypatch) -> tuple[list[BatchingWorker], list[tuple[int, int, int]]]:
    """The worker once it runs, and each claim as (limit, jobs running when it was made, jobs got)."""
    workers: list[BatchingWorker] = []
    claims: list[tuple[int, int, int]] = []
    run = BatchingWorker.run

    async def spied_run(self) -> None:
        workers.append(self)
        fetch_jobs = self.app.job_manager.fetch_jobs

        async def spied_fetch_jobs(*args, limit: int, **kwargs):
            running = len(self._running_jobs)
            found = await fetch_jobs(*args, limit=limit, **kwargs)
            claims.append((limit, running, len(found)))
            return found

        self.app.job_manager.fetch_jobs = spied_fetch_jobs
        try:
            await run(self)
        finally:
            del self.app.job_manager.fetch_jobs

    monkeypatch.setattr(BatchingWorker, "run", spied_run)
    return workers, claims


def _run_worker(until, *, concurrency: int, poll: float = 0.5) -> None:
    """A listening worker on QUEUE_A (polling every `poll` s) until `until(worker)` (a coroutine
    function) returns."""

    async def scenario() -> None:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            async with worker_app.open_async():
                worker = asyncio.create_task(
                    worker_app.run_worker_async(
                        queues=[tasks.QUEUE_A],
                        concurrency=concurrency,
                        wait=True,
                        install_signal_handlers=False,
                        listen_notify=True,
                        fetch_job_polling_interval=poll,
                    )
                )
                try:
                    await until(worker)
                finally:
                    worker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await worker

    asyncio.run(scenario())


async def _until(predicate, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def _processed(job_id: int) -> int | None:
    info = JobInfo.objects.filter(job_id=job_id).first()
    return info.processed if info else None


def test_with_short_jobs_the_next_claim_overlaps_the_running_jobs_and_every_job_runs_once(monkeypatch, settings):
    settings.JOBS_CLAIM_AHEAD_MS = 1000.0  # every job of this machine's slowest run is shorter
    workers, claims = _spy_claims(monkeypatch)
    jobs = [job_defer(tasks.stamp_a, n=n, sleep=0.005) for n in range(1, 61)]

    _run_worker(lambda worker: _until(lambda: all(job_status(j) == "succeeded" for j in jobs)), concurrency=2)

    # Claims made while both slots ran a job: the claim ahead (a plain claim waits for a slot).
    assert any(running == 2 and got for _, running, got in claims), claims
    assert [_processed(j) for j in jobs] == list(range(1, 61))  # each ran, with its own arguments
    assert all(job_events(j).count("started") == 1 for j in jobs)  # and once
    assert not workers[0]._held


@pytest.mark.parametrize("limit_ms", [0.0, 1.0])
def test_off_or_with_jobs_longer_than_the_limit_a_job_is_only_claimed_for_a_free_slot(monkeypatch, settings, limit_ms):
    settings.JOBS_CLAIM_AHEAD_MS = limit_ms
    _, claims = _spy_claims(monkeypatch)
    jobs = [job_defer(tasks.stamp_a, n=n, sleep=0.02) for n in range(1, 13)]  # 20 ms: over 1 ms

    _run_worker(lambda worker: _until(lambda: all(job_status(j) == "succeeded" for j in jobs)), concurrency=2)

    assert claims and all(running < 2 for _, running, _ in claims), claims


def test_a_stop_hands_back_the_held_jobs_that_never_started(monkeypatch, settings, tmp_path):
    # Concurrency 1: a short job makes the jobs' moving average short, then the worker takes the
    # long one and, its only slot busy, claims the next job ahead and holds it.
    settings.JOBS_CLAIM_AHEAD_MS = 1000.0
    workers, _ = _spy_claims(monkeypatch)
    release = tmp_path / "release"
    short = job_defer(tasks.stamp_a, n=1)
    long = job_defer(tasks.wait_for_release, release_path=str(release))
    held = job_defer(tasks.stamp_a, n=3)
    seen: dict[str, object] = {}

    async def until(worker_task: asyncio.Task) -> None:
        await _until(lambda: job_status(long) == "doing" and job_status(held) == "doing")
        worker = workers[0]
        seen["known"] = held in worker._known_job_ids()  # an outage's re-queue keeps it
        worker.stop()
        # Handed back before the running job is waited for: `todo` again while it still runs.
        await _until(lambda: job_status(held) == "todo")
        seen["long"] = await asyncio.to_thread(job_status, long)
        Path(release).touch()
        await worker_task

    _run_worker(until, concurrency=1)

    assert seen == {"known": True, "long": "doing"}
    assert [job_status(short), job_status(long), job_status(held)] == ["succeeded", "succeeded", "todo"]
    assert _processed(held) is None  # it never ran
    assert query("SELECT worker_id, attempts FROM procrastinate_jobs WHERE id = %s", [held]) == [(None, 0)]
    # The next worker runs it, once.
    settings.JOBS_CLAIM_AHEAD_MS = 0.0
    _run_worker(lambda worker: _until(lambda: job_status(held) == "succeeded"), concurrency=1)
    assert _processed(held) == 3


def test_a_claim_ahead_that_finds_nothing_still_leaves_the_plain_claim_when_a_slot_frees(monkeypatch, settings):
    # Procrastinate's worker finds a retried job with the claim it makes once the slot frees (a
    # retry sends no NOTIFY). A claim ahead that came back empty while the job ran must not
    # make the worker wait for a NOTIFY or its poll instead: without the middleware's own wake-up
    # (as in Procrastinate's own suite), the retry then waited for the poll.
    from jobs.engine import middleware

    settings.JOBS_CLAIM_AHEAD_MS = 1000.0
    monkeypatch.setattr(middleware, "_wake_at", lambda worker, when: None)
    _, claims = _spy_claims(monkeypatch)
    short = job_defer(tasks.stamp_a, n=1)  # its end gives the moving average a value
    flaky = job_defer(tasks.fails_once)

    _run_worker(lambda worker: _until(lambda: job_status(flaky) == "succeeded", timeout=15), concurrency=1, poll=60)

    assert job_status(short) == "succeeded"
    assert any(running == 1 and not got for _, running, got in claims), claims  # the empty claim ahead
