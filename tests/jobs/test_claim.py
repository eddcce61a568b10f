"""The claim (jobs/manager.py's CLAIM_JOBS, `BatchingJobManager.fetch_jobs`) on real PostgreSQL:
Procrastinate's `procrastinate_fetch_job_v2` rules with a LIMIT of many, and the paused queues.

Jobs are written straight into procrastinate_jobs (no worker runs them), then claimed the way a
worker claims them: on the worker's own pool, as a registered worker, up to `limit` at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from procrastinate.contrib.django import app

from jobs.console import services
from jobs.engine.connector import PREPARE_THRESHOLD
from jobs.engine.manager import CLAIM_JOBS, FAIR_ORDER, FINISH_JOBS, PRIORITY_ORDER
from tests.factories import make_user
from tests.helpers import claim_jobs, on_worker_pool
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import query

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE_A = tasks.QUEUE_A
QUEUE_B = tasks.QUEUE_B


def _add(*, queue: str = QUEUE_A, priority: int = 0, lock: str | None = None, scheduled_at=None) -> int:
    [(job_id,)] = query(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, args, scheduled_at)"
        " VALUES (%s, 'tests.claimed', %s, %s, '{}', %s) RETURNING id",
        [queue, priority, lock, scheduled_at],
    )
    return job_id


def _doing() -> set[int]:
    return {row[0] for row in query("SELECT id FROM procrastinate_jobs WHERE status = 'doing'")}


_FINISH = "UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = ANY(%(ids)s)"


def _finish(job_ids: list[int]) -> None:
    query(_FINISH, {"ids": job_ids})


def test_the_highest_priority_first_then_the_oldest():
    low = _add(priority=0)
    high = _add(priority=10)
    middle = _add(priority=5)
    high_later = _add(priority=10)
    negative = _add(priority=-3)

    assert claim_jobs(limit=10) == [high, high_later, middle, low, negative]


def test_the_limit_takes_the_most_urgent_jobs_and_leaves_the_others_waiting():
    jobs = [_add(priority=p) for p in (1, 4, 2, 5, 3)]

    assert claim_jobs(limit=2) == [jobs[3], jobs[1]]
    assert claim_jobs(limit=2) == [jobs[4], jobs[2]]
    assert claim_jobs(limit=2) == [jobs[0]]
    assert claim_jobs(limit=2) == []
    assert _doing() == set(jobs)


def test_one_claim_of_many_takes_only_one_job_of_a_lock():
    first_of_lock = _add(lock="note:1")
    second_of_lock = _add(lock="note:1")
    other_lock = _add(lock="note:2")
    unlocked = [_add(), _add()]

    assert sorted(claim_jobs(limit=10)) == sorted([first_of_lock, other_lock, *unlocked])
    # While the first runs, its successor waits, even for a claim with slots to spare.
    assert claim_jobs(limit=10) == []
    _finish([first_of_lock])
    assert claim_jobs(limit=10) == [second_of_lock]


def test_a_lock_runs_its_most_urgent_job_first():
    older_low = _add(lock="digest:7", priority=0)
    newer_high = _add(lock="digest:7", priority=5)

    assert claim_jobs(limit=10) == [newer_high]
    _finish([newer_high])
    assert claim_jobs(limit=10) == [older_low]


def test_jobs_without_a_lock_never_exclude_each_other():
    jobs = [_add() for _ in range(5)]

    assert sorted(claim_jobs(limit=10)) == jobs


def test_a_paused_queue_is_not_claimed_and_its_jobs_are_once_it_resumes():
    services.queue_pause(queue=QUEUE_A, by=make_user("ops"))
    paused = _add(queue=QUEUE_A, priority=10)
    running = _add(queue=QUEUE_B)

    assert claim_jobs(limit=10) == [running]
    assert claim_jobs(limit=10, queues=[QUEUE_A]) == []
    services.queue_resume(queue=QUEUE_A)
    assert claim_jobs(limit=10) == [paused]


def test_a_lock_keeps_its_order_across_queues_even_when_the_first_queue_is_paused():
    # As in Procrastinate: a lock's jobs run in their order wherever they wait, so the job of a
    # running queue waits for its lock's earlier job in a paused one.
    services.queue_pause(queue=QUEUE_A, by=make_user("ops"))
    first = _add(queue=QUEUE_A, lock="note:3")
    second = _add(queue=QUEUE_B, lock="note:3")

    assert claim_jobs(limit=10) == []
    services.queue_resume(queue=QUEUE_A)
    assert claim_jobs(limit=10) == [first]
    _finish([first])
    assert claim_jobs(limit=10) == [second]


def test_only_the_worker_queues_are_claimed():
    a_job = _add(queue=QUEUE_A)
    b_job = _add(queue=QUEUE_B)

    assert claim_jobs(limit=10, queues=[QUEUE_B]) == [b_job]
    assert claim_jobs(limit=10, queues=[QUEUE_A, QUEUE_B]) == [a_job]


def test_a_job_scheduled_in_the_future_is_not_claimed_until_it_is_due():
    later = _add(scheduled_at=timezone.now() + timedelta(hours=1))
    due = _add(scheduled_at=timezone.now() - timedelta(seconds=1))
    unscheduled = _add()

    assert sorted(claim_jobs(limit=10)) == [due, unscheduled]
    query("UPDATE procrastinate_jobs SET scheduled_at = now() - interval '1 second' WHERE id = %s", [later])
    assert claim_jobs(limit=10) == [later]


def test_workers_claiming_at_once_never_get_the_same_job_nor_two_jobs_of_one_lock():
    # 8 locks of 6 jobs each and 80 jobs without a lock, claimed by 4 workers at once (each on
    # its own connection), 5 at a time, round after round; a round's jobs end before the next.
    locked = {_add(lock=f"lock:{n % 8}", priority=n % 3): f"lock:{n % 8}" for n in range(48)}
    unlocked = [_add(priority=n % 3) for n in range(80)]

    async def claim_everything(manager):
        worker_ids = [await manager.register_worker() for _ in range(4)]
        rounds = []
        while True:
            claims = await asyncio.gather(
                *(manager.fetch_jobs(queues=None, worker_id=worker_id, limit=5) for worker_id in worker_ids)
            )
            claimed = [job for jobs in claims for job in jobs]
            if not claimed:
                return rounds
            rounds.append(claimed)
            await manager.connector.execute_query_async(_FINISH, ids=[job.id for job in claimed])

    rounds = asyncio.run(on_worker_pool(claim_everything))

    claims = Counter(job.id for claimed in rounds for job in claimed)
    assert sorted(claims) == sorted([*locked, *unlocked])
    assert set(claims.values()) == {1}  # no job twice
    for claimed in rounds:
        locks = [job.lock for job in claimed if job.lock is not None]
        assert len(locks) == len(set(locks)), f"two jobs of one lock in one round: {sorted(locks)}"
    # Each lock's jobs ran one per round, so no fewer rounds than the longest lock has jobs.
    assert len(rounds) >= 6


def _claim_drained(limit: int) -> tuple[int, bool]:
    """One claim of up to `limit` jobs: how many it took, and whether it says it took every job
    it could (the worker's fetch loop then waits for a NOTIFY instead of claiming again)."""

    async def claim(manager):
        worker_id = await manager.register_worker()
        jobs = await manager.fetch_jobs(queues=None, worker_id=worker_id, limit=limit)
        return len(jobs), manager.last_claim_drained

    return asyncio.run(on_worker_pool(claim))


def test_a_claim_that_finds_fewer_jobs_than_it_asks_for_says_it_drained_the_queue():
    for _ in range(5):
        _add()

    assert _claim_drained(limit=3) == (3, False)  # as many as asked: others may be waiting
    assert _claim_drained(limit=3) == (2, True)
    assert _claim_drained(limit=3) == (0, True)


def test_a_claim_that_leaves_jobs_of_a_full_lock_behind_counts_them_as_seen():
    # The second job of a lock cannot run while the first is waiting ahead of it: not a candidate,
    # so a claim of 3 that takes the first (and a plain job) found all it could.
    _add(lock="L")
    _add(lock="L")
    _add()

    assert _claim_drained(limit=3) == (2, True)


def test_a_listening_worker_that_claimed_every_waiting_job_waits_for_a_notify_not_another_claim(monkeypatch):
    # Concurrency 3, one job waiting: the claim takes it and says it took all there was, so the
    # worker does not claim again for nothing (a round trip beside the job it just started); the
    # NOTIFY of the next defer still wakes it at once (the poll is far off).
    from procrastinate import jobs as procrastinate_jobs

    from jobs.tasking.defer import job_defer
    from tests.jobs.workers import job_status

    first = job_defer(tasks.stamp_a, n=1)
    claims: list[list[int]] = []
    later: list[int] = []

    async def scenario() -> None:
        with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
            manager = worker_app.job_manager
            fetch_jobs = manager.fetch_jobs

            async def spied_fetch_jobs(*args, **kwargs) -> list[procrastinate_jobs.Job]:
                found = await fetch_jobs(*args, **kwargs)
                claims.append([job.id for job in found])
                return found

            monkeypatch.setattr(manager, "fetch_jobs", spied_fetch_jobs)
            async with worker_app.open_async():
                worker = asyncio.create_task(
                    worker_app.run_worker_async(
                        queues=[QUEUE_A],
                        concurrency=3,
                        wait=True,
                        install_signal_handlers=False,
                        listen_notify=True,
                        fetch_job_polling_interval=60,
                    )
                )
                for _ in range(100):
                    if claims or worker.done():
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # time for a second claim, were one made
                later.append(await asyncio.to_thread(job_defer, tasks.stamp_a, n=2))
                for _ in range(100):
                    if len(claims) > 1 or worker.done():
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # its end written
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker

    asyncio.run(scenario())
    assert claims == [[first], later], claims
    assert [job_status(first), job_status(later[0])] == ["succeeded", "succeeded"]


def _plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def _explain_on_worker_pool(statement: str, make_params) -> list[dict]:
    """EXPLAIN ANALYZE of `statement` on a registered worker's pool, twice psycopg's prepare
    threshold (the custom plans, then the prepared one); `make_params(manager, worker_id)`."""
    explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement

    async def plans(manager):
        worker_id = await manager.register_worker()
        out = []
        for _ in range(2 * PREPARE_THRESHOLD):
            params = await make_params(manager, worker_id)
            [row] = await manager.connector.execute_query_all_async(explain, **params)
            plan = row["QUERY PLAN"]
            out.append((json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"])
        return out

    return asyncio.run(on_worker_pool(plans))


def _burst_after_an_empty_queue(count: int = 3000) -> None:
    """`count` jobs waiting, and statistics that say the table is empty (as after a drained queue)."""
    query("ANALYZE procrastinate_jobs")  # empty: every test starts with no job
    query(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
        " SELECT %s, 'tests.claimed', '{}' FROM generate_series(1, %s)",
        [QUEUE_A, count],
    )


def test_a_burst_after_an_empty_queue_is_claimed_a_few_index_entries_at_a_time():
    """After ANALYZE saw the table empty, PostgreSQL expects one waiting job. A claim must still
    walk the claim index for the first few jobs, not read all 3,000 through another partial
    index and sort them (each claim of 10 reading the whole backlog: quadratic in the backlog)."""
    _burst_after_an_empty_queue()
    order = FAIR_ORDER if settings.JOBS_FAIR_CLAIMS else PRIORITY_ORDER

    async def params(manager, worker_id):
        return {"queues": None, "worker_id": worker_id}

    for plan in _explain_on_worker_pool(CLAIM_JOBS.format(limit=10, order=order), params):
        scans = [n for n in _plan_nodes(plan) if n.get("Alias") == "jobs" and "Scan" in n["Node Type"]]
        assert [(n.get("Index Name"), n["Actual Rows"] <= 20) for n in scans] == [("jobs_fair_claim_idx", True)]


def test_a_batch_of_completions_reads_none_of_the_waiting_jobs_when_no_ended_job_had_a_lock():
    """The end of a job of a lock wakes the queues of that lock's waiting jobs; jobs without a lock
    wake nobody, and writing their ends must not read the 3,000 jobs still waiting."""
    _burst_after_an_empty_queue()

    async def params(manager, worker_id):
        jobs = await manager.fetch_jobs(queues=None, worker_id=worker_id, limit=10)
        return {
            "ids": [job.id for job in jobs],
            "statuses": ["succeeded"] * len(jobs),
            "worker_ids": [worker_id] * len(jobs),
            "deletes": [False] * len(jobs),
            "results": [None] * len(jobs),
            "ttls": [None] * len(jobs),
            "keys": [],
        }

    for plan in _explain_on_worker_pool(FINISH_JOBS, params):
        nodes = [n for n in _plan_nodes(plan) if n.get("Relation Name") == "procrastinate_jobs"]
        assert nodes and max(n["Actual Rows"] for n in nodes) <= 10
        # Each ended job found by its primary key alone: the partial index of `doing` jobs by
        # worker keeps an entry for every job the worker ran since the last vacuum (bench/soak.py
        # saw one batch take 98 s through it).
        ended = {
            n.get("Index Name") for n in nodes if n.get("Alias", "").startswith("job") and "Scan" in n["Node Type"]
        }
        assert ended == {"procrastinate_jobs_pkey"}


def _info_rows_read() -> int:
    [(read,)] = query(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables"
        " WHERE relname = 'jobs_job_info'"
    )
    return read


def test_a_batch_of_completions_of_jobs_with_info_rows_reads_only_the_watched_ones():
    """Jobs of users have a jobs_job_info row. The end trigger (migration 0006) looks up the
    watched ones (live streams) and those with a completion webhook: with 3,000 rows and
    statistics that say none, ten batches of ten ends must not read them all, twice a batch
    (with every finished job kept, each batch would read the whole table)."""
    query("ANALYZE jobs_job_info")  # empty
    _burst_after_an_empty_queue()
    query("INSERT INTO jobs_job_info (job_id) SELECT id FROM procrastinate_jobs")
    before = _info_rows_read()

    async def end_batches(manager):
        worker_id = await manager.register_worker()
        for _ in range(2 * PREPARE_THRESHOLD):
            jobs = await manager.fetch_jobs(queues=None, worker_id=worker_id, limit=10)
            await manager.connector.execute_query_all_async(
                FINISH_JOBS,
                ids=[job.id for job in jobs],
                statuses=["succeeded"] * len(jobs),
                worker_ids=[worker_id] * len(jobs),
                deletes=[False] * len(jobs),
                results=[None] * len(jobs),
                ttls=[None] * len(jobs),
                keys=[],
            )
        # A known read of every row, so that the counts below are known to include the batches'.
        await manager.connector.execute_query_async("SELECT count(*) FROM jobs_job_info")

    asyncio.run(on_worker_pool(end_batches))  # the pool's sessions end: their statistics are sent
    deadline = time.monotonic() + 10
    while _info_rows_read() - before < 3000 and time.monotonic() < deadline:
        time.sleep(0.1)
    read = _info_rows_read() - before - 3000
    assert 0 <= read <= 200
