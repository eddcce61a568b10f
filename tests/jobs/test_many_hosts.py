"""Many workers, many hosts: worker processes that each have their own host name and a clock
tens of seconds (or minutes) off the others' share one PostgreSQL correctly.

Each worker is its own process (`manage.py procrastinate worker`) with `WORKER_HOSTNAME` set and
its clock moved by libfaketime (tests/helpers.py: skewed_clock_env). Whatever the workers must
agree on is decided on the database's clock (docs/operating.md, "Several worker hosts"):
periodic ticks, rate-limit buckets, circuit breakers and heartbeats.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib import admin
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone
from procrastinate.contrib.django.models import ProcrastinateWorker

from bench.harness import free_port
from jobs.tasking import queues
from jobs.tasking.defer import job_defer
from jobs.tasks import retry_stalled_jobs
from notifications import services as notification_services
from notifications.models import DeliveryLog
from tests.factories import make_recipient, make_user
from tests.helpers import kill_worker, skewed_clock_env, smtp_env, start_worker_process, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_events, job_status, query, start_test_worker, wait_for_workers

pytestmark = pytest.mark.django_db(transaction=True)

# Three hosts: one 30 s ahead, one 30 s behind, one on time.
HOSTS = {"host-ahead": "+30s", "host-behind": "-30s", "host-on-time": "+0s"}


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """The worker processes a test starts; any still running at its end are stopped (a failed
    test included), so none keeps the test database in use."""
    workers: list[subprocess.Popen] = []
    yield workers
    for worker in workers:
        if worker.poll() is None:
            kill_worker(worker)


def host_env(host: str, offset: str | None = None) -> dict[str, str]:
    return {"WORKER_HOSTNAME": host, **skewed_clock_env(offset or HOSTS[host])}


def stop_all(workers: list[subprocess.Popen]) -> str:
    return "\n".join(f"--- worker {n}:\n{stop_worker(w)}" for n, w in enumerate(workers))


def until(condition, what: str, workers: list[subprocess.Popen], timeout: float = 90) -> None:
    try:
        wait_for(condition, timeout=timeout, what=what)  # a loaded machine starts workers slowly
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the workers said:\n{stop_all(workers)}") from None


# --- Periodic tasks ----------------------------------------------------------------------------
def _periodic_defers() -> list[tuple[int, float]]:
    """(tick, seconds from the tick to its job's `deferred` event on the database's clock)."""
    rows = query(
        "SELECT (j.args->>'timestamp')::bigint, extract(epoch FROM e.at)::float - (j.args->>'timestamp')::bigint"
        " FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'deferred'"
        " WHERE j.task_name = 'tests.periodic_hosts' ORDER BY 1"
    )
    return [(int(tick), float(late)) for tick, late in rows]


def test_a_periodic_task_is_deferred_once_per_tick_on_the_database_clock_by_workers_30_s_apart(started):
    cron = {"TESTS_HOSTS_PERIODIC_CRON": "* * * * * */2"}  # every 2 s (croniter's seconds field)
    workers = [start_test_worker("--queues", tasks.QUEUE_A, env={**host_env(h), **cron}) for h in HOSTS]
    started.extend(workers)
    registered = "SELECT count(jobs_host) FROM procrastinate_workers"  # the host is written right after the row
    until(lambda: query(registered)[0][0] == len(HOSTS), "workers", workers)
    # Each worker's row names its host (settings.WORKER_HOSTNAME), the dashboard shows it.
    assert sorted(host for (host,) in query("SELECT jobs_host FROM procrastinate_workers")) == sorted(HOSTS)
    first = max([tick for tick, _ in _periodic_defers()], default=0)
    until(lambda: len([t for t, _ in _periodic_defers() if t > first]) >= 5, "five ticks more", workers)
    output = stop_all(workers)

    defers = _periodic_defers()
    ticks = [tick for tick, _ in defers]
    assert len(ticks) == len(set(ticks)), (defers, output)  # once per tick across the three hosts
    assert ticks == list(range(ticks[0], ticks[-1] + 1, 2)), (defers, output)  # and none missed
    # None before its time by the database's clock: the host 30 s ahead does not defer early.
    early = [(tick, late) for tick, late in defers if late < -1]
    assert early == [], (defers, output)


# --- Rate limits and circuit breakers --------------------------------------------------------
def test_a_rate_limit_token_taken_on_one_host_is_gone_for_two_others(started):
    owner = make_user("limited")
    env = {"JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS": "0"}
    # The host ahead takes the owner's one token of the minute first...
    ids = [job_defer(tasks.limited_per_owner, owner_id=owner.id, n=0)]  # one a minute
    workers = [start_test_worker("--queues", tasks.QUEUE_A, env={**host_env("host-ahead"), **env})]
    started.extend(workers)
    until(lambda: job_status(ids[0]) == "succeeded", "the first job", workers)
    output = stop_all(workers)
    # ... then the two other hosts find none left for the rest.
    ids += [job_defer(tasks.limited_per_owner, owner_id=owner.id, n=n) for n in range(1, 7)]
    others = [
        start_test_worker("--queues", tasks.QUEUE_A, env={**host_env(h), **env}) for h in HOSTS if h != "host-ahead"
    ]
    started.extend(others)
    workers = others

    def settled() -> bool:
        return all(job_status(i) == "succeeded" or "deferred_for_retry" in job_events(i) for i in ids)

    until(settled, "every job run or postponed", workers)
    output += stop_all(workers)
    ran = [i for i in ids if job_status(i) == "succeeded"]
    assert ran == ids[:1], output  # together the hosts never exceed one a minute
    # Each postponed to the owner's next token: a minute after the first host took the last one,
    # on the database's clock. Measured from the first job's start (the token is taken a moment
    # later, seconds on a loaded machine); a host's 30 s would show.
    delays = query(
        "SELECT extract(epoch FROM j.scheduled_at - e.at)::float FROM procrastinate_jobs j,"
        " procrastinate_events e WHERE e.job_id = %s AND e.type = 'started' AND j.id = ANY(%s)",
        [ids[0], ids[1:]],
    )
    assert len(delays) == 6 and all(58 < delay < 75 for (delay,) in delays), (delays, output)


def _send(owner, recipient):
    return notification_services.notification_send_email(
        owner=owner, recipient=recipient, subject="Hello", body="Hi", notification_type="system", priority="normal"
    )


def test_a_breaker_opened_by_a_worker_30_s_ahead_holds_for_a_worker_ten_minutes_ahead(smtp, started):
    owner = make_user("breaker")
    recipient = make_recipient(owner)
    first = _send(owner, recipient)
    breaker_env = {"NOTIFICATIONS_BREAKER_THRESHOLD": "1", "NOTIFICATIONS_BREAKER_COOLDOWN_SECONDS": "120"}
    dead = {"EMAIL_URL": f"smtp://127.0.0.1:{free_port()}"}  # nothing listens: the mail server is down
    opener = start_worker_process("--queues", "notifications", env={**host_env("host-ahead"), **breaker_env, **dead})
    started.append(opener)
    until(
        lambda: (
            query("SELECT state FROM jobs_circuit_breakers WHERE name = %s", [notification_services.EMAIL_BREAKER])
            == [("open",)]
        ),
        "the breaker opened",
        [opener],
    )
    stop_worker(opener)

    second = _send(owner, recipient)
    other = start_worker_process(
        "--queues", "notifications", env={**host_env("host-far-ahead", "+10m"), **breaker_env, **smtp_env(smtp)}
    )
    started.append(other)
    until(lambda: DeliveryLog.objects.filter(notification=second).exists(), "the second delivery attempt", [other])
    output = stop_worker(other)
    assert smtp.messages == [], output  # the host ten minutes ahead sees the cooldown as not over
    assert list(DeliveryLog.objects.filter(notification=second).values_list("outcome", flat=True)) == ["postponed"]
    assert DeliveryLog.objects.filter(notification=first).exists()


# --- The stalled-job rescue --------------------------------------------------------------------
def test_the_rescue_on_a_host_ten_minutes_ahead_never_takes_a_live_workers_job(tmp_path: Path, started):
    release = tmp_path / "release"
    live_job = tasks.wait_for_release.defer(release_path=str(release))
    dead_job = tasks.echo.defer(value="held by a worker that is gone")
    query("UPDATE procrastinate_jobs SET status = 'doing', worker_id = NULL WHERE id = %s", [dead_job])
    # Deferred first: its queueing lock keeps the workers' periodic deferrers from adding another.
    rescue = retry_stalled_jobs.defer(timestamp=0)
    # On time: its job sleeps, and time.sleep fails (EINVAL) under libfaketime's DONT_FAKE_MONOTONIC.
    live = start_test_worker("--queues", tasks.QUEUE_A, env={"WORKER_HOSTNAME": "host-on-time"})
    started.append(live)
    until(lambda: job_status(live_job) == "doing", "the live worker's job running", [live])
    [(live_worker,)] = query("SELECT worker_id FROM procrastinate_jobs WHERE id = %s", [live_job])

    rescuer = start_test_worker("--queues", queues.MAINTENANCE, env=host_env("host-ahead", "+10m"))
    started.append(rescuer)
    until(lambda: job_status(rescue) in ("succeeded", "failed"), "the rescue", [live, rescuer])
    wait_for_workers(2)
    assert job_status(rescue) == "succeeded", stop_all([live, rescuer])
    assert job_status(dead_job) in ("todo", "doing", "succeeded")  # rescued (the live worker may run it since)
    # The live worker's is not, though its heartbeat is ten minutes old by the rescuer's clock.
    assert query("SELECT status, worker_id FROM procrastinate_jobs WHERE id = %s", [live_job]) == [
        ("doing", live_worker)
    ]
    release.write_text("go")
    until(lambda: job_status(live_job) == "succeeded", "the live job's end", [live, rescuer])
    stop_worker(live)
    output = stop_worker(rescuer)
    assert f"Retried 1 stalled job(s): [{dead_job}]" in output, output  # that one only


# --- What a web host shows ---------------------------------------------------------------------
def test_the_admin_on_a_web_host_ten_minutes_ahead_shows_a_live_worker_alive(monkeypatch, admin_client):
    [(live_id,)] = query(
        "INSERT INTO procrastinate_workers (last_heartbeat, jobs_host) VALUES (now(), 'host-a') RETURNING id"
    )
    [(dead_id,)] = query(
        "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour') RETURNING id"
    )
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(minutes=10))  # this web host's clock

    worker_admin = admin.site._registry[ProcrastinateWorker]
    workers = {w.id: w for w in worker_admin.get_queryset(RequestFactory().get("/"))}
    assert worker_admin.alive(workers[live_id]) is True  # its heartbeat is fresh by the database's clock
    assert worker_admin.alive(workers[dead_id]) is False
    page = admin_client.get(reverse("admin:procrastinate_procrastinateworker_changelist"))
    assert page.status_code == 200 and "host-a" in page.content.decode()  # the host column
