"""Concurrency limits per key (`job_task(concurrency=N, concurrency_key=...)`, migration 0012):
at most N jobs of a key `doing` at once across every worker, enforced in the claim; a job over
its limit stays `todo` (no attempt spent, not postponed) and runs as soon as a slot frees.

Each limited test task records, as it starts, how many jobs of its key the database says run
(tests/jobs/tasks_for_tests.py, `_running_now`): read after its claim committed, so it counts
every committed claim; the tests assert on the highest of those counts."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from datetime import timedelta

import psycopg
import pytest
from procrastinate.contrib.django import app

from jobs.console import services
from jobs.engine.manager import CLAIM_JOBS, FAIR_ORDER, BatchingJobManager
from jobs.tasking.defer import job_defer, job_defer_bulk
from jobs.tasking.registry import job_task
from tests.factories import make_user
from tests.helpers import claim_jobs, database_url, on_worker_pool, run_worker, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import event_times, job_events, job_status, query, start_test_worker, wait_for_workers

pytestmark = pytest.mark.django_db(transaction=True)

N = tasks.CONCURRENCY


def _seen(job_ids: list[int]) -> list[int]:
    """What each job recorded: the jobs of its key running when it started."""
    rows = query("SELECT processed FROM jobs_job_info WHERE job_id = ANY(%s) AND processed IS NOT NULL", [job_ids])
    return [row[0] for row in rows]


def _running(key: str) -> int | None:
    rows = query("SELECT running FROM jobs_concurrency_slots WHERE key = %s", [key])
    return rows[0][0] if rows else None


def _statuses(job_ids: list[int]) -> list[str]:
    return [job_status(job_id) for job_id in job_ids]


def _worker(*args: str, poll: float = 5.0):
    return start_test_worker(
        "--queues", tasks.QUEUE_A, "--fetch-job-polling-interval", str(poll), *args, env={"PYTHONUNBUFFERED": "1"}
    )


def _all_succeeded(job_ids: list[int]):
    return lambda: all(status == "succeeded" for status in _statuses(job_ids))


# --- Done means: N with three workers and 10 x N jobs ------------------------------------------


def test_three_workers_never_run_more_than_the_limit_of_a_key():
    workers = [_worker("--concurrency", "4", poll=0.5) for _ in range(3)]  # 12 slots for a limit of 2
    try:
        wait_for_workers(3, timeout=120)
        ids = job_defer_bulk(tasks.limited_slots, [{"group": "a", "sleep": 0.15} for _ in range(10 * N)])
        wait_for(_all_succeeded(ids), timeout=120, what="every limited job")
    finally:
        output = "".join(stop_worker(worker) for worker in workers)
    seen = _seen(ids)
    assert len(seen) == 10 * N, output
    assert max(seen) <= N, (seen, output)
    # Each ran once (no attempt lost to the limit) and the slots are all free again.
    assert {row[0] for row in query("SELECT attempts FROM procrastinate_jobs WHERE id = ANY(%s)", [ids])} == {1}
    assert _running("group:a") == 0
    # More than one worker took part: the limit held across processes, not inside one.
    workers_seen = query("SELECT DISTINCT progress->>'worker' FROM jobs_job_info WHERE job_id = ANY(%s)", [ids])
    assert len(workers_seen) > 1, output


# --- Over the limit: todo, untouched, claimed when a slot frees -------------------------------


def test_a_job_over_the_limit_stays_todo_without_an_attempt_and_runs_when_a_slot_frees(tmp_path):
    release = tmp_path / "release"
    running = [job_defer(tasks.limited_slots, group="a", release_path=str(release)) for _ in range(N)]
    waiting = job_defer(tasks.limited_slots, group="a")
    # Listening off and a long poll: only the end that frees a slot can start the waiting job soon.
    worker = _worker("--concurrency", "4", "--no-listen-notify")
    try:
        wait_for(lambda: _statuses(running) == ["doing"] * N, timeout=60, what="the first jobs")
        # Several claims later (the worker has free slots and polls), it still waits, untouched.
        assert _running("group:a") == N
        row = query("SELECT status, attempts, scheduled_at FROM procrastinate_jobs WHERE id = %s", [waiting])
        assert row == [("todo", 0, None)]
        assert job_events(waiting) == ["deferred"]

        release.write_text("go")
        wait_for(_all_succeeded([*running, waiting]), timeout=60, what="every job")
    finally:
        output = stop_worker(worker)
    [started] = event_times(waiting, "started")
    first_end = min(event_times(job_id, "succeeded")[0] for job_id in running)
    assert started - first_end < timedelta(seconds=2.5), output  # the poll is 5 s: woken by the end
    assert max(_seen([*running, waiting])) <= N
    assert query("SELECT attempts FROM procrastinate_jobs WHERE id = %s", [waiting]) == [(1,)]


def test_a_worker_idle_because_the_key_was_full_hears_of_the_freed_slot(tmp_path):
    # The slot is freed by a worker of another queue's job... of the same key: only the NOTIFY
    # sent when that end commits can tell the idle worker (its poll is 5 s).
    release = tmp_path / "release"
    holder = _worker("--concurrency", "1")
    second = None
    try:
        wait_for_workers(1, timeout=60)
        held = [job_defer(tasks.limited_slots, group="a", release_path=str(release)) for _ in range(N)]
        wait_for(lambda: _statuses(held[:1]) == ["doing"], timeout=60, what="the first job")
        second = _worker("--concurrency", "2")
        wait_for_workers(2, timeout=60)
        wait_for(lambda: _statuses(held) == ["doing"] * N, timeout=60, what="the limit reached")
        waiting = job_defer(tasks.limited_slots, group="a")
        release.write_text("go")
        wait_for(_all_succeeded([*held, waiting]), timeout=60, what="every job")
    finally:
        output = stop_worker(holder) + (stop_worker(second) if second is not None else "")
    [started] = event_times(waiting, "started")
    first_end = min(event_times(job_id, "succeeded")[0] for job_id in held)
    assert started - first_end < timedelta(seconds=2.5), output


def test_keys_are_independent(tmp_path):
    release = tmp_path / "release"
    full = [job_defer(tasks.limited_slots, group="a", release_path=str(release)) for _ in range(N + 1)]
    other = [job_defer(tasks.limited_slots, group="b") for _ in range(3 * N)]
    worker = _worker("--concurrency", "6", poll=0.5)
    try:
        # Key b drains while key a is full, its extra job waiting.
        wait_for(_all_succeeded(other), timeout=60, what="the other key's jobs")
        assert sorted(_statuses(full)) == ["doing"] * N + ["todo"]
        release.write_text("go")
        wait_for(_all_succeeded(full), timeout=60, what="the full key's jobs")
    finally:
        stop_worker(worker)
    assert max(_seen(full)) <= N and max(_seen(other)) <= N


def test_a_limit_without_a_key_is_one_for_the_whole_task():
    ids = [job_defer(tasks.limited_task, sleep=0.05) for _ in range(5)]
    run_worker(queues=[tasks.QUEUE_A], concurrency=4)  # one-shot: drains the task one at a time
    assert _statuses(ids) == ["succeeded"] * 5
    assert _seen(ids) == [1] * 5
    assert query(
        "SELECT DISTINCT jobs_concurrency_key, jobs_concurrency_limit FROM procrastinate_jobs WHERE id = ANY(%s)", [ids]
    ) == [("task:tests.limited_task", 1)]


# --- Every way out of `doing` frees the slot --------------------------------------------------


def test_a_retried_job_takes_a_slot_again_and_the_key_drains(tmp_path):
    ids = [job_defer(tasks.limited_flaky, group="g", fail_path=str(tmp_path / f"failed-{n}")) for n in range(3)]
    worker = _worker("--concurrency", "3", poll=0.5)
    try:
        wait_for(_all_succeeded(ids), timeout=90, what="the flaky jobs")
    finally:
        output = stop_worker(worker)
    assert [job_events(job_id).count("deferred_for_retry") for job_id in ids] == [1, 1, 1], output
    assert max(_seen(ids)) == 1
    assert _running("flaky:g") == 0


def test_a_job_deleted_when_it_ends_frees_its_slot():
    ids = job_defer_bulk(tasks.limited_slots, [{"group": "a"} for _ in range(3 * N)])
    worker = _worker("--concurrency", "4", "--delete-jobs", "always", poll=0.5)
    try:
        wait_for(lambda: not query("SELECT 1 FROM procrastinate_jobs WHERE id = ANY(%s)", [ids]), timeout=60,
                 what="every job deleted")  # fmt: skip
    finally:
        stop_worker(worker)
    assert _running("group:a") == 0


def test_operator_paths_out_of_doing_keep_the_count():
    ids = job_defer_bulk(tasks.limited_slots, [{"group": "a"} for _ in range(N)])
    assert len(claim_jobs(limit=5)) == N
    assert _running("group:a") == N
    query("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = %s", [ids[0]])  # an operator's SQL
    assert _running("group:a") == N - 1
    query("DELETE FROM procrastinate_jobs WHERE id = %s", [ids[1]])
    assert _running("group:a") == N - 2


# --- The claim: exact under races -------------------------------------------------------------


def _worker_row() -> int:
    return query("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")[0][0]


def test_two_claims_racing_on_the_last_slot_take_it_once():
    # The first claim takes the last slot and has not committed; the second, whose snapshot
    # shows the slot free, waits on the slot's row and then reads the latest count: nothing.
    job_defer_bulk(tasks.limited_slots, [{"group": "a"} for _ in range(N + 2)])
    query("INSERT INTO jobs_concurrency_slots (key) VALUES ('group:a')")  # the same race for a new key's row
    assert len(claim_jobs(limit=N - 1)) == N - 1
    params = {"queues": None, "worker_id": _worker_row()}
    first = psycopg.connect(database_url())
    second = psycopg.connect(database_url(), autocommit=True)
    try:
        with first.transaction():
            # One job locked: the second claim finds the others, not locked, and a free slot.
            assert len(first.execute(CLAIM_JOBS.format(limit=1, order=FAIR_ORDER), params).fetchall()) == 1
            claim = CLAIM_JOBS.format(limit=5, order=FAIR_ORDER)
            got: list = []
            racer = threading.Thread(target=lambda: got.extend(second.execute(claim, params).fetchall()))
            racer.start()
            wait_for(lambda: _waits_on_a_lock(second), timeout=10, what="the second claim to wait")
        racer.join(10)
        assert got == []
    finally:
        first.close()
        second.close()
    assert _running("group:a") == N
    assert query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'") == [(N,)]


def _waits_on_a_lock(conn: psycopg.Connection) -> bool:
    rows = query("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [conn.info.backend_pid])
    return rows == [("Lock",)]


def test_many_claims_at_once_never_exceed_the_limit():
    job_defer_bulk(tasks.limited_slots, [{"group": group} for _ in range(10) for group in "ab"])
    claimed: list[int] = []
    finished: list[bool] = []
    lock = threading.Lock()
    # Each thread its own worker connector and manager (app.replace_connector is process-wide).
    make_connector = app.connector.get_worker_connector

    async def claim_on_own_pool() -> list[int]:
        connector = make_connector()
        await connector.open_async()
        try:
            manager = BatchingJobManager(connector)
            worker_id = await manager.register_worker()
            return [job.id for job in await manager.fetch_jobs(queues=None, worker_id=worker_id, limit=3)]
        finally:
            await connector.close_async()

    def claim() -> None:
        ids = asyncio.run(claim_on_own_pool())
        with lock:
            claimed.extend(ids)
            finished.append(True)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(finished) == 8  # every claim ran (none raised)
    doing = query("SELECT id FROM procrastinate_jobs WHERE status = 'doing'")
    assert sorted(claimed) == sorted(row[0] for row in doing)
    # A claim whose snapshot showed a slot free that a racing claim took gets fewer jobs, never
    # more: one claim more, alone, tops each key up to its limit and no further.
    claimed.extend(claim_jobs(limit=10))
    keys = query(
        "SELECT jobs_concurrency_key, count(*) FROM procrastinate_jobs WHERE status = 'doing' GROUP BY 1 ORDER BY 1"
    )
    assert keys == [("group:a", N), ("group:b", N)]
    assert len(claimed) == 2 * N
    assert [_running("group:a"), _running("group:b")] == [N, N]


def test_the_claim_takes_a_keys_jobs_in_the_fair_order_and_passes_over_a_full_key():
    # Two owners: their jobs alternate in the fair order; a full key is skipped for plain jobs.
    alice, bob = make_user("alice"), make_user("bob")
    a = job_defer_bulk(tasks.limited_slots, [{"group": "a"}] * 3, owner_id=alice.id)
    b = job_defer_bulk(tasks.limited_slots, [{"group": "a"}] * 3, owner_id=bob.id)
    plain = job_defer(tasks.echo, value=1)
    first = claim_jobs(limit=10)
    assert sorted(first) == sorted([a[0], b[0], plain])
    assert claim_jobs(limit=10) == []


def test_the_limit_holds_in_procrastinates_priority_order_too(settings):
    settings.JOBS_FAIR_CLAIMS = False
    low = job_defer_bulk(tasks.limited_slots, [{"group": "a"}] * 3, priority=0)
    high = job_defer(tasks.limited_slots, group="a", priority=5)
    assert sorted(claim_jobs(limit=10)) == sorted([high, low[0]])  # the key's slots, highest priority first
    assert claim_jobs(limit=10) == []


def test_the_limit_with_a_lock_and_fair_claims():
    alice, bob = make_user("alice"), make_user("bob")
    locked = [job_defer(tasks.limited_slots, group="a", lock="L", sleep=0.05, owner_id=alice.id) for _ in range(3)]
    free = job_defer_bulk(tasks.limited_slots, [{"group": "a", "sleep": 0.05}] * 6, owner_id=[alice.id, bob.id] * 3)
    worker = _worker("--concurrency", "5", poll=0.5)
    try:
        wait_for(_all_succeeded(locked + free), timeout=60, what="every job")
    finally:
        stop_worker(worker)
    assert max(_seen(locked + free)) <= N
    spans = sorted((event_times(i, "started")[0], event_times(i, "succeeded")[0]) for i in locked)
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(spans))


# --- Drift: the reconciliation ----------------------------------------------------------------


def test_the_reconciliation_recomputes_the_counts_from_the_running_jobs():
    job_defer_bulk(tasks.limited_slots, [{"group": "a"} for _ in range(N + 1)])
    job_defer(tasks.limited_slots, group="b")
    assert len(claim_jobs(limit=10)) == N + 1
    # Drift: a count too high blocks the key; a slot of a key with nothing running is left over.
    query("UPDATE jobs_concurrency_slots SET running = 99 WHERE key = 'group:a'")
    query("INSERT INTO jobs_concurrency_slots (key, running) VALUES ('group:gone', 3)")
    query("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE jobs_concurrency_key = 'group:b'")
    assert claim_jobs(limit=10) == []

    fixed = services.jobs_concurrency_reconcile()

    assert fixed == [{"key": "group:a", "counted": 99, "actual": N}, {"key": "group:gone", "counted": 3, "actual": 0}]
    assert query("SELECT key, running FROM jobs_concurrency_slots ORDER BY key") == [("group:a", N)]
    assert services.jobs_concurrency_reconcile() == []


def test_the_stalled_job_rescue_reconciles():
    job_defer(tasks.limited_slots, group="a")
    query("INSERT INTO jobs_concurrency_slots (key, running) VALUES ('group:a', 5)")

    async def rescue(manager):
        return await services.jobs_retry_stalled(job_manager=manager, seconds_since_heartbeat=3600)

    report = asyncio.run(on_worker_pool(rescue))
    assert report["concurrency_fixed"] == [{"key": "group:a", "counted": 5, "actual": 0}]
    assert _running("group:a") is None


# --- The task author's API --------------------------------------------------------------------


def test_the_key_is_a_format_of_the_kwargs_and_the_owner():
    owner = make_user("carol")

    @job_task(name="tests.keyed_by_owner", queue=tasks.QUEUE_A, concurrency=3, concurrency_key="llm:user:{owner_id}")
    def keyed(*, note_id: int) -> None: ...

    job_defer(keyed, owner_id=owner.id, note_id=1)
    job_defer_bulk(keyed, [{"note_id": 2}], owner_id=owner.id)
    assert (
        query("SELECT jobs_concurrency_key, jobs_concurrency_limit FROM procrastinate_jobs")
        == [(f"llm:user:{owner.id}", 3)] * 2
    )


def test_a_key_function_returning_none_leaves_the_job_unlimited():
    @job_task(name="tests.keyed_maybe", queue=tasks.QUEUE_A, concurrency=1,
              concurrency_key=lambda kwargs: kwargs.get("domain"))  # fmt: skip
    def keyed(*, domain: str | None = None) -> None: ...

    job_defer(keyed, domain="example.com")
    job_defer(keyed)
    assert query("SELECT jobs_concurrency_key FROM procrastinate_jobs ORDER BY id") == [("example.com",), (None,)]


def test_a_key_naming_a_missing_argument_is_refused_at_defer():
    with pytest.raises(ValueError, match="group"):
        job_defer(tasks.limited_slots)  # no `group`: the job would otherwise escape its limit
    assert query("SELECT count(*) FROM procrastinate_jobs") == [(0,)]


def test_procrastinates_own_defer_sets_the_key_too():
    # task.defer() (and the admin's, the CLI's) go through Procrastinate's insert: ours there.
    limited = tasks.limited_slots.defer(group="z")
    [batch_first, _] = tasks.limited_task.batch_defer({"sleep": 0}, {"sleep": 1})
    plain = tasks.echo.defer(value=1)
    rows = query("SELECT id, jobs_concurrency_key, jobs_concurrency_limit, args FROM procrastinate_jobs ORDER BY id")
    assert [row[:3] for row in rows] == [
        (limited, "group:z", N),
        (batch_first, "task:tests.limited_task", 1),
        (batch_first + 1, "task:tests.limited_task", 1),
        (plain, None, None),
    ]
    assert [json.loads(row[3]) for row in rows[1:3]] == [{"sleep": 0}, {"sleep": 1}]  # Django leaves jsonb text


def test_a_limited_task_cannot_be_a_batchs_callback():
    from jobs.tasking.workflows import job_batch, job_call

    with pytest.raises(ValueError, match="concurrency limit"), job_batch(on_complete=job_call(tasks.limited_task)):
        pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "at least 1"),
        ({"concurrency": "2"}, "number"),
        ({"concurrency_key": "k"}, "goes with concurrency"),
        ({"concurrency": 1, "cron": "* * * * *", "periodic_id": "x"}, "periodic"),
    ],
)
def test_bad_options_are_refused_when_the_task_is_declared(options, message):
    with pytest.raises(ValueError, match=message):
        job_task(name="tests.bad_concurrency", queue=tasks.QUEUE_A, **options)


def test_plain_jobs_write_no_slot():
    ids = [job_defer(tasks.echo, value=n) for n in range(3)]
    run_worker(queues=[tasks.QUEUE_A], concurrency=2)
    assert _statuses(ids) == ["succeeded"] * 3
    assert query("SELECT count(*) FROM jobs_concurrency_slots") == [(0,)]


def test_the_operators_command_reconciles():
    from io import StringIO

    from django.core.management import call_command

    query("INSERT INTO jobs_concurrency_slots (key, running) VALUES ('group:a', 4)")
    out = StringIO()
    call_command("jobs_queue", "reconcile", stdout=out)
    assert out.getvalue().splitlines() == ["group:a: counted 4 running, 0 actually", "Corrected 1 concurrency key(s)."]
    assert _running("group:a") is None


def test_a_claim_the_database_cancels_for_a_deadlock_is_made_again(monkeypatch):
    # Claims and ends lock slot rows in key order (an end's rows first, FINISH_JOBS), but should
    # the database break a deadlock by cancelling a claim, the worker must not stop: it takes it
    # as a lost database (DeadlockDetected is an OperationalError), waits and claims again.
    from procrastinate.exceptions import ConnectorException

    original = BatchingJobManager.fetch_jobs
    calls = []

    async def deadlocked_once(self, queues, worker_id, limit):
        calls.append(limit)
        if len(calls) == 1:
            try:
                raise psycopg.errors.DeadlockDetected("deadlock detected")
            except psycopg.Error as exc:
                raise ConnectorException("claim failed") from exc
        return await original(self, queues, worker_id, limit)

    monkeypatch.setattr(BatchingJobManager, "fetch_jobs", deadlocked_once)
    job_id = job_defer(tasks.limited_task)
    run_worker(queues=[tasks.QUEUE_A])
    assert job_status(job_id) == "succeeded"
    assert len(calls) >= 2, calls


def _any_queue_notifies_when_one_of(claimed: int) -> int:
    """Claim `claimed` jobs of key group:a (limit N, more waiting), end one through the batch of
    completions, and count the NOTIFYs to every worker that the end's commit sent."""
    waiting = [job_defer(tasks.limited_slots, group="a") for _ in range(N + 2)]
    assert len(waiting) > claimed
    listener = psycopg.connect(database_url(), autocommit=True)
    listener.execute("LISTEN procrastinate_any_queue_v1")

    async def end_one(manager):
        from procrastinate.jobs import Status

        worker_id = await manager.register_worker()
        jobs = await manager.fetch_jobs(queues=None, worker_id=worker_id, limit=claimed)
        assert len(jobs) == claimed
        manager.finish_job_later(jobs[0], Status.SUCCEEDED, worker_id=worker_id, delete_job=False)
        await manager.wait_written()

    try:
        asyncio.run(on_worker_pool(end_one))
        return len(list(listener.notifies(timeout=0.5)))
    finally:
        listener.close()


def test_an_end_wakes_the_other_workers_only_when_its_key_had_every_slot_taken():
    # Below the limit no job of the key waits for a slot (a claim takes them while one is free),
    # so the end looks up nothing and wakes nobody: in the feature costs' run (limit 1,000, ten
    # keys) those lookups were most of a keyed job's PostgreSQL time.
    assert _any_queue_notifies_when_one_of(claimed=1) == 0
    query("TRUNCATE procrastinate_events, procrastinate_jobs, jobs_concurrency_slots RESTART IDENTITY CASCADE")
    assert _any_queue_notifies_when_one_of(claimed=N) == 1  # full: its waiting jobs may run now
