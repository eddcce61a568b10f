"""Job dependencies and batches (issue 13), with real workers on real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from django.db import transaction

from jobs.console.services import job_retry
from jobs.tasking.defer import job_defer, job_defer_bulk
from jobs.tasking.workflows import (
    job_batch,
    job_batch_counts,
    job_batch_open,
    job_batch_seal,
    job_call,
    job_chain,
    job_fan_in,
)
from tests.helpers import run_worker, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import event_times, job_status, query, start_test_worker, wait_for_workers

pytestmark = pytest.mark.django_db(transaction=True)


def _json(value):
    return json.loads(value) if isinstance(value, str) else value  # Django's cursor leaves jsonb as text


def _result(job_id: int):
    return _json(query("SELECT result FROM jobs_job_info WHERE job_id = %s", [job_id])[0][0])


def _error(job_id: int) -> str:
    rows = query("SELECT error FROM jobs_job_info WHERE job_id = %s", [job_id])
    return rows[0][0] if rows else ""


def _callbacks(task_name: str = "tests.batch_report") -> list[tuple[int, dict]]:
    rows = query("SELECT id, args FROM procrastinate_jobs WHERE task_name = %s ORDER BY id", [task_name])
    return [(row[0], _json(row[1])) for row in rows]


# --- Dependencies -------------------------------------------------------------------------------


def test_a_child_runs_after_its_parents_succeeded_and_reads_their_results():
    a = job_defer(tasks.echo, value=1)
    b = job_defer(tasks.echo, value=2)
    child = job_defer(tasks.parent_results, after=[a, b])
    assert query("SELECT jobs_parents_waiting FROM procrastinate_jobs WHERE id = %s", [child]) == [(2,)]

    run_worker(queues=[tasks.QUEUE_A])

    assert [job_status(a), job_status(b), job_status(child)] == ["succeeded"] * 3
    assert _result(child) == {str(a): {"echo": 1}, str(b): {"echo": 2}}
    [started] = event_times(child, "started")
    assert all(started >= ended for parent in (a, b) for ended in event_times(parent, "succeeded"))


def test_the_claim_skips_a_child_whose_parent_has_not_ended():
    parent = job_defer(tasks.stamp_b)  # on queue B, which no worker serves here
    child = job_defer(tasks.echo, after=[parent], value="x")

    run_worker(queues=[tasks.QUEUE_A])  # returns when nothing on A is ready

    assert job_status(child) == "todo"
    run_worker(queues=[tasks.QUEUE_B])
    assert job_status(parent) == "succeeded"
    assert query("SELECT jobs_parents_waiting FROM procrastinate_jobs WHERE id = %s", [child]) == [(0,)]
    run_worker(queues=[tasks.QUEUE_A])
    assert job_status(child) == "succeeded"


def test_a_chain_and_a_fan_in_run_in_order():
    with transaction.atomic():
        first, second, third = job_chain(
            job_call(tasks.stamp_a, n=1), job_call(tasks.stamp_a, n=2), job_call(tasks.stamp_a, n=3)
        )
        *parts, report = job_fan_in(
            [job_call(tasks.echo, value=i) for i in range(3)], then=job_call(tasks.parent_results)
        )

    run_worker(queues=[tasks.QUEUE_A], concurrency=4)

    times = [(event_times(j, "started")[0], event_times(j, "succeeded")[0]) for j in (first, second, third)]
    assert times[0][1] <= times[1][0] and times[1][1] <= times[2][0]
    assert _result(report) == {str(part): {"echo": i} for i, part in enumerate(parts)}


def test_a_one_shot_worker_runs_the_child_of_a_parent_that_ends_while_an_empty_claim_is_in_flight(monkeypatch):
    """`wait=False` stops at the first empty claim with nothing running, but a job that ended
    during that claim may have unblocked a child (its end is not written yet): claim again."""
    from jobs.engine.manager import BatchingJobManager

    fetch_jobs = BatchingJobManager.fetch_jobs

    async def slow_when_empty(self, *args, **kwargs):
        jobs = await fetch_jobs(self, *args, **kwargs)
        if not jobs:
            await asyncio.sleep(0.5)  # the parent (0.2 s) ends while this claim is "in flight"
        return jobs

    monkeypatch.setattr(BatchingJobManager, "fetch_jobs", slow_when_empty)
    with transaction.atomic():
        parent, child = job_chain(job_call(tasks.stamp_a, n=1, sleep=0.2), job_call(tasks.stamp_a, n=2))
        quick = job_defer(tasks.echo, value="first to end")

    run_worker(queues=[tasks.QUEUE_A], concurrency=2)

    assert [job_status(quick), job_status(parent), job_status(child)] == ["succeeded"] * 3


def test_a_parent_that_fails_cancels_its_children_and_theirs_with_the_reason():
    parent = job_defer(tasks.fail_permanently, reason="broken")
    child = job_defer(tasks.echo, after=[parent], value=1)
    grandchild = job_defer(tasks.echo, after=[child], value=2)

    run_worker(queues=[tasks.QUEUE_A])

    assert [job_status(parent), job_status(child), job_status(grandchild)] == ["failed", "cancelled", "cancelled"]
    assert _error(child) == f"Cancelled: its parent job {parent} ended failed"
    assert _error(grandchild) == f"Cancelled: its parent job {child} ended cancelled"


def test_a_child_whose_policy_is_run_runs_after_its_parent_failed():
    parent = job_defer(tasks.fail_permanently, reason="broken")
    sibling = job_defer(tasks.echo, value="ok")
    child = job_defer(tasks.parent_results, after=[parent, sibling], on_parent_failure="run")

    run_worker(queues=[tasks.QUEUE_A])

    assert [job_status(parent), job_status(child)] == ["failed", "succeeded"]
    assert _result(child) == {str(parent): None, str(sibling): {"echo": "ok"}}


def test_a_cancelled_parent_cancels_its_waiting_child():
    parent = job_defer(tasks.stamp_b)
    child = job_defer(tasks.echo, after=[parent], value=1)
    query("UPDATE procrastinate_jobs SET status = 'cancelled' WHERE id = %s", [parent])
    assert job_status(child) == "cancelled"
    assert _error(child) == f"Cancelled: its parent job {parent} ended cancelled"


def test_a_parent_retried_by_an_operator_unblocks_its_children_when_it_succeeds(tmp_path):
    flag = tmp_path / "fixed"
    parent = job_defer(tasks.fail_unless_file, path=str(flag))
    child = job_defer(tasks.echo, after=[parent], value=1)
    grandchild = job_defer(tasks.parent_results, after=[child])
    run_worker(queues=[tasks.QUEUE_A])
    assert [job_status(parent), job_status(child), job_status(grandchild)] == ["failed", "cancelled", "cancelled"]

    job_retry(job_id=parent)
    # Back to waiting, blocked until the parent succeeds.
    assert [job_status(child), job_status(grandchild)] == ["todo", "todo"]
    assert query("SELECT jobs_parents_waiting FROM procrastinate_jobs WHERE id = %s", [child]) == [(1,)]
    flag.write_text("")
    run_worker(queues=[tasks.QUEUE_A])

    assert [job_status(parent), job_status(child), job_status(grandchild)] == ["succeeded"] * 3
    assert _error(child) == ""
    assert _result(grandchild) == {str(child): {"echo": 1}}


def test_a_child_cancelled_by_two_failed_parents_comes_back_only_when_both_are_retried(tmp_path):
    flag = tmp_path / "fixed"
    first = job_defer(tasks.fail_unless_file, path=str(flag))
    second = job_defer(tasks.fail_unless_file, path=str(flag))
    child = job_defer(tasks.echo, after=[first, second], value=1)
    run_worker(queues=[tasks.QUEUE_A])
    assert job_status(child) == "cancelled"

    job_retry(job_id=first)
    assert job_status(child) == "cancelled"  # its other parent is still failed
    job_retry(job_id=second)
    assert job_status(child) == "todo"
    flag.write_text("")
    run_worker(queues=[tasks.QUEUE_A])
    assert job_status(child) == "succeeded"


def test_after_refuses_an_unknown_parent_and_one_that_already_failed():
    with pytest.raises(ValueError, match="no job 999999"):
        job_defer(tasks.echo, after=[999999], value=1)
    failed = job_defer(tasks.fail_permanently, reason="x")
    run_worker(queues=[tasks.QUEUE_A])
    with pytest.raises(ValueError, match="already ended failed"):
        job_defer(tasks.echo, after=[failed], value=1)
    assert job_status(job_defer(tasks.echo, after=[failed], on_parent_failure="run", value=1)) == "todo"


def test_a_bulk_fan_out_waits_for_its_parent():
    parent = job_defer(tasks.stamp_a, sleep=0.2)
    children = job_defer_bulk(tasks.echo, [{"value": i} for i in range(5)], after=[parent])
    run_worker(queues=[tasks.QUEUE_A], concurrency=3)
    [ended] = event_times(parent, "succeeded")
    assert all(event_times(child, "started")[0] >= ended for child in children)


def test_a_child_on_another_worker_starts_when_its_parent_ends_not_at_the_next_poll():
    poll = 5.0
    worker_a = start_test_worker("--queues", tasks.QUEUE_A, "--fetch-job-polling-interval", str(poll))
    worker_b = start_test_worker("--queues", tasks.QUEUE_B, "--fetch-job-polling-interval", str(poll))
    try:
        wait_for_workers(2, timeout=120)
        parent = job_defer(tasks.stamp_a, sleep=0.5)
        child = job_defer(tasks.stamp_b, after=[parent])
        wait_for(lambda: job_status(child) == "succeeded", timeout=60, what="the child")
    finally:
        output = stop_worker(worker_a) + stop_worker(worker_b)
    [ended] = event_times(parent, "succeeded")
    [started] = event_times(child, "started")
    assert (started - ended).total_seconds() < poll / 2, output


# --- Batches ------------------------------------------------------------------------------------


def test_a_batch_defers_its_callbacks_once_with_the_counts():
    with job_batch(
        on_success=job_call(tasks.batch_report, which="success"),
        on_failure=job_call(tasks.batch_report, which="failure"),
        on_complete=job_call(tasks.batch_report, which="complete"),
    ) as batch:
        for i in range(4):
            job_defer(tasks.echo, value=i)
        job_defer(tasks.fail_permanently, reason="x")
    assert job_batch_counts(batch_id=batch.id)[batch.id].total == 5

    run_worker(queues=[tasks.QUEUE_A], concurrency=2)

    counts = {"batch_id": batch.id, "total": 5, "succeeded": 4, "failed": 1, "cancelled": 0}
    assert sorted(args["which"] for _, args in _callbacks()) == ["complete", "failure"]
    assert all({k: v for k, v in args.items() if k != "which"} == counts for _, args in _callbacks())
    state = job_batch_counts(batch_id=batch.id)[batch.id]
    assert (state.state, state.done, state.completions) == ("done", 5, 1)
    assert sorted(state.callback_job_ids) == sorted(job_id for job_id, _ in _callbacks())
    run_worker(queues=[tasks.QUEUE_B])
    assert all(job_status(job_id) == "succeeded" for job_id, _ in _callbacks())


def test_an_empty_batch_completes_at_once_and_a_rolled_back_one_leaves_nothing():
    with job_batch(on_success=job_call(tasks.batch_report)) as batch:
        pass
    assert [args for _, args in _callbacks()] == [
        {"batch_id": batch.id, "total": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    ]
    with pytest.raises(RuntimeError), job_batch(on_success=job_call(tasks.batch_report)):
        job_defer(tasks.echo, value=1)
        raise RuntimeError("rolled back")
    assert len(_callbacks()) == 1 and query(
        "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'tests.echo'"
    ) == [(0,)]


def test_a_batch_built_over_several_transactions_completes_only_once_sealed():
    batch_id = job_batch_open(on_complete=job_call(tasks.batch_report))
    job_defer_bulk(tasks.echo, [{"value": 1}, {"value": 2}], batch_id=batch_id)
    run_worker(queues=[tasks.QUEUE_A])
    assert _callbacks() == []  # both ended, but more may come
    job_defer(tasks.echo, value=3, batch_id=batch_id)
    job_batch_seal(batch_id)
    assert _callbacks() == []
    run_worker(queues=[tasks.QUEUE_A])
    assert [args["succeeded"] for _, args in _callbacks()] == [3]
    with pytest.raises(ValueError, match="not open"):
        job_defer(tasks.echo, value=4, batch_id=batch_id)


def test_retrying_a_batchs_failed_member_completes_it_again(tmp_path):
    flag = tmp_path / "fixed"
    with job_batch(on_complete=job_call(tasks.batch_report)) as batch:
        job_defer(tasks.echo, value=1)
        failing = job_defer(tasks.fail_unless_file, path=str(flag))
    run_worker(queues=[tasks.QUEUE_A])
    assert [(a["succeeded"], a["failed"]) for _, a in _callbacks()] == [(1, 1)]

    flag.write_text("")
    job_retry(job_id=failing)
    assert job_batch_counts(batch_id=batch.id)[batch.id].state == "sealed"
    run_worker(queues=[tasks.QUEUE_A])
    assert [(a["succeeded"], a["failed"]) for _, a in _callbacks()] == [(1, 1), (2, 0)]


def test_several_workers_ending_the_last_members_at_once_defer_one_callback(tmp_path):
    # 12 members held on a file, 3 workers x 4 slots: all run at once, and all end within
    # milliseconds once the file appears, in three workers' completion batches.
    release = tmp_path / "release"
    with job_batch(on_complete=job_call(tasks.batch_report), on_success=job_call(tasks.batch_report)) as batch:
        members = [job_defer(tasks.wait_for_release, release_path=str(release), n=i) for i in range(12)]
    workers = [start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "4") for _ in range(3)]
    try:
        wait_for(
            lambda: query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")[0][0] == 12,
            timeout=120,
            what="every member running",
        )
        assert (
            len({row[0] for row in query("SELECT DISTINCT worker_id FROM procrastinate_jobs WHERE status = 'doing'")})
            == 3
        )
        Path(release).write_text("")
        wait_for(lambda: all(job_status(m) == "succeeded" for m in members), timeout=60, what="the members")
    finally:
        output = "".join(stop_worker(w) for w in workers)
    assert len(_callbacks()) == 2, output  # on_success and on_complete, once each
    state = job_batch_counts(batch_id=batch.id)[batch.id]
    assert (state.succeeded, state.completions) == (12, 1)
