"""GET /api/jobs/metrics/ and `selectors.job_metrics`: numbers checked against jobs a real worker ran."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobs.console.selectors import job_metrics
from jobs.tasking import queues
from jobs.tasking.defer import job_defer
from jobs.tasking.registry import job_task
from tests.factories import make_user
from tests.helpers import client_for, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


@job_task(name="tests.metrics.ok", queue=queues.IMPORTS)
def ok(*, n: int) -> int:
    time.sleep(0.01)
    return n


@job_task(name="tests.metrics.boom", queue=queues.IMPORTS)
def boom(*, n: int) -> None:
    raise ValueError("always fails")


@job_task(name="tests.metrics.later", queue=queues.IMPORTS)
def later(*, n: int) -> None:
    return None


def _event_times(job_id: int) -> dict[str, object]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT type::text, at FROM procrastinate_events WHERE job_id = %s", [job_id])
        return dict(cursor.fetchall())


def test_metrics_count_throughput_percentiles_and_failure_rate():
    alice, bob = make_user("alice"), make_user("bob")
    for n in range(4):
        job_defer(ok, owner_id=alice.id, n=n)
    for n in range(2):
        job_defer(boom, owner_id=alice.id, n=n)
    job_defer(ok, owner_id=bob.id, n=99)
    run_worker(queues=["imports"])
    waiting = job_defer(ok, owner_id=alice.id, n=100)  # due, never run
    job_defer(ok, owner_id=alice.id, schedule_at=timezone.now() + timedelta(hours=1), n=101)  # not due

    response = client_for(alice).get("/api/jobs/metrics/")
    assert response.status_code == 200
    metrics = response.json()
    assert metrics["hours"] == 24
    assert metrics["counts"] == {"imports": {"succeeded": 4, "failed": 2, "todo": 2}}

    throughput = metrics["throughput"]
    assert (throughput["succeeded"], throughput["failed"]) == (4, 2)
    assert sum(m["succeeded"] for m in throughput["per_minute"]) == 4
    assert sum(m["failed"] for m in throughput["per_minute"]) == 2
    assert all(m["minute"].endswith(":00Z") for m in throughput["per_minute"])
    assert throughput["average_succeeded_per_minute"] == round(4 / (24 * 60), 4)

    ok_stats = metrics["tasks"]["tests.metrics.ok"]
    assert (ok_stats["count"], ok_stats["succeeded"], ok_stats["failed"], ok_stats["failure_rate"]) == (4, 4, 0, 0.0)
    for key in ("enqueue_to_start_ms", "run_time_ms"):
        p = ok_stats[key]
        assert p["p50"] is not None and 0 <= p["p50"] <= p["p95"] <= p["p99"], (key, p)
    assert ok_stats["run_time_ms"]["p50"] >= 10  # the task sleeps 10 ms
    boom_stats = metrics["tasks"]["tests.metrics.boom"]
    assert (boom_stats["count"], boom_stats["failed"], boom_stats["failure_rate"]) == (2, 2, 1.0)
    assert "tests.metrics.later" not in metrics["tasks"]

    oldest = metrics["oldest_waiting"]
    assert oldest["id"] == waiting and oldest["task"] == "tests.metrics.ok" and oldest["age_seconds"] >= 0

    # Bob sees only his job; staff see everyone's (the plain selector the dashboard uses too).
    bob_metrics = client_for(bob).get("/api/jobs/metrics/?hours=1").json()
    assert bob_metrics["counts"] == {"imports": {"succeeded": 1}}
    assert bob_metrics["tasks"]["tests.metrics.ok"]["count"] == 1 and bob_metrics["oldest_waiting"] is None
    staff = client_for(make_user("sam", is_staff=True)).get("/api/jobs/metrics/").json()
    assert staff["tasks"]["tests.metrics.ok"]["count"] == 5
    everyone = job_metrics(hours=24)
    # (the worker also deferred the periodic jobs, on other queues)
    assert everyone["counts"]["imports"] == {"succeeded": 5, "failed": 2, "todo": 2}
    assert job_metrics(hours=24, owner_id=alice.id)["tasks"]["tests.metrics.boom"]["failure_rate"] == 1.0


def test_enqueue_to_start_counts_from_the_scheduled_time_not_the_defer():
    owner = make_user("carol")
    job_id = job_defer(later, owner_id=owner.id, schedule_at=timezone.now() + timedelta(seconds=1), n=1)
    time.sleep(1.2)
    run_worker(queues=["imports"])
    events = _event_times(job_id)
    since_defer_ms = (events["started"] - events["deferred"]).total_seconds() * 1000
    since_due_ms = (events["started"] - events["scheduled"]).total_seconds() * 1000
    assert since_defer_ms >= 1000

    stats = client_for(owner).get("/api/jobs/metrics/").json()["tasks"]["tests.metrics.later"]
    assert stats["enqueue_to_start_ms"]["p50"] == pytest.approx(since_due_ms, abs=1)
    assert stats["enqueue_to_start_ms"]["p50"] < since_defer_ms


def test_finished_jobs_outside_the_window_are_left_out():
    owner = make_user("dan")
    job_id = job_defer(ok, owner_id=owner.id, n=1)
    run_worker(queues=["imports"])
    with connection.cursor() as cursor:  # the job ran three hours ago
        cursor.execute("UPDATE procrastinate_events SET at = at - interval '3 hours' WHERE job_id = %s", [job_id])
    api = client_for(owner)
    recent = api.get("/api/jobs/metrics/?hours=2").json()
    assert recent["counts"] == {} and recent["tasks"] == {} and recent["throughput"]["succeeded"] == 0
    wider = api.get("/api/jobs/metrics/?hours=4").json()
    assert wider["counts"] == {"imports": {"succeeded": 1}} and wider["tasks"]["tests.metrics.ok"]["count"] == 1


@pytest.mark.parametrize("hours", ["0", "721", "abc", "-3", "2.5"])
def test_bad_hours_is_400(hours):
    response = client_for(make_user("eve")).get(f"/api/jobs/metrics/?hours={hours}")
    assert response.status_code == 400 and "hours" in response.json()
