"""What `make chaos` (bench/chaos.py) and `make failover` (bench/failover.py) share: the child
processes, the HTTP client posting all along, the once-a-second sampler, the throughput around
an outage, the table, and the bounded run (a SIGALRM budget, JSON results).

Everything runs on 127.0.0.1; each child process logs to a file of the run's log directory,
never to a pipe.
"""

from __future__ import annotations

import bisect
import collections
import http.client
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from bench.harness import BASE_DIR, PYTHON, percentile, server_args
from bench.peers import CountingSmtpSink
from tests.peers.postgres import ThrowawayPostgres

FULL_THROUGHPUT = 0.8  # "full" throughput: this share of the median rate before the outage
CLIENT_TIMEOUT_SECONDS = 5.0
HANG = "hang (no answer in 5 s)"


def service_env(url: str, sink: CountingSmtpSink, secret_prefix: str) -> dict[str, str]:
    """The environment of the run's web and worker processes: production settings (DEBUG off),
    e-mail to the sink, no rate limit or quota in the way, a short heartbeat and a stalled-job
    rescue every second so that a killed worker's jobs come back quickly."""
    return {
        **os.environ,
        "DATABASE_URL": url,
        "DEBUG": "false",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or f"{secret_prefix}-" + "x" * 40,
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


def prepare(notifications: int, *, name: str) -> tuple[list[int], str, int]:
    """In this process, on DATABASE_URL: migrate, create the users and recipients, queue
    `notifications` e-mails in bulk. Returns their ids and the API client's token and recipient."""
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
    owner = make_user(f"{name}-bulk")
    recipients = Recipient.objects.bulk_create(
        [Recipient(owner=owner, name=f"R{i}", email=f"r{i}@example.com") for i in range(1000)]
    )
    bulk_ids: list[int] = []
    for start in range(0, notifications, 1000):
        size = min(1000, notifications - start)
        bulk_ids += notification_send_bulk(
            owner=owner,
            recipients=recipients[:size],
            subject=name.capitalize(),
            body=f"Hello from the {name} run",
            notification_type="system",
            priority="normal",
        )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # what autovacuum would do after such a batch, within a minute
    client_user = make_user(f"{name}-api")
    recipient = Recipient.objects.create(owner=client_user, name="Api", email="api@example.com")
    token = Token.objects.create(user=client_user).key
    connection.close()  # from here on the driver reads with short-lived connections of its own
    return bulk_ids, token, recipient.id


# --- Processes ---------------------------------------------------------------------------------
class Processes:
    """The run's child processes, each logging to <log_dir>/<name>.log."""

    def __init__(self, env: dict[str, str], *, log_dir: Path, queues: str) -> None:
        self.env, self.log_dir, self.queues = env, log_dir, queues
        self.workers: dict[str, subprocess.Popen] = {}
        self.others: list[subprocess.Popen] = []
        self.exits: collections.Counter[str] = collections.Counter()  # unexpected exits by code
        self.started = 0

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "a") as log:
            log.write(f"\n--- started at {datetime.now(UTC).isoformat(timespec='milliseconds')}: {shlex.join(args)}\n")
            log.flush()
            return subprocess.Popen([PYTHON, *args], cwd=BASE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(name, "manage.py", "procrastinate", "worker", "--queues", self.queues)
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

    def start_gunicorn(self, port: int) -> subprocess.Popen:
        process = self._spawn("gunicorn", *server_args(port))
        self.others.append(process)
        return process

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
    acknowledged: list[int] = field(default_factory=list)  # ids of the rows the answers created
    latencies_ms: list[float] = field(default_factory=list)
    unavailable_without_hint: int = 0  # 503s missing Retry-After or the JSON retry_after
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, outcome)
    samples: dict[str, str] = field(default_factory=dict)  # one body per unexpected outcome

    def first(self, outcome: str, *, after: float) -> float | None:
        """The monotonic time of the first `outcome` at or after `after`."""
        return next((at for at, seen in self.timeline if at >= after and seen == outcome), None)


def send_email_request(recipient_id: int) -> Callable[[int], dict]:
    return lambda number: {"recipient_id": recipient_id, "subject": f"Outage {number}", "body": "Hello"}


class ApiClient(threading.Thread):
    """POSTs `path` `rate` times a second until stopped, with `body(number)`; an answer with
    status `accepted` acknowledges the row whose id it gives under `id_key`."""

    def __init__(
        self,
        *,
        port: int,
        token: str,
        rate: float,
        path: str = "/api/notifications/send-email/",
        body: Callable[[int], dict],
        accepted: int = 202,
        id_key: str = "notification_id",
        name: str = "api-client",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.port, self.token, self.rate, self.path = port, token, rate, path
        self.body, self.accepted, self.id_key = body, accepted, id_key
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
            outcome = self._post(json.dumps(self.body(number)), headers)
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
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            return HANG
        except OSError as exc:
            self.log.samples.setdefault("connection error", repr(exc))
            return "connection error"
        finally:
            conn.close()
            self.log.latencies_ms.append((time.monotonic() - started) * 1000)
        if response.status == self.accepted:
            self.log.acknowledged.append(json.loads(data)[self.id_key])
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

    def counts(self) -> tuple[int, int, int, int]:
        """(server errors other than 503, hangs, other unexpected outcomes, all requests)."""
        statuses = self.log.statuses
        server_errors = sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and s != "503")
        hangs = statuses.get(HANG, 0)
        expected = statuses.get(str(self.accepted), 0) + statuses.get("503", 0)
        return server_errors, hangs, sum(statuses.values()) - expected - server_errors - hangs, sum(statuses.values())


# --- What the database looks like, once a second --------------------------------------------
SAMPLE = """
SELECT (SELECT count(*) FROM procrastinate_jobs WHERE task_name LIKE 'notifications.deliver%' AND status = 'todo'),
       (SELECT count(*) FROM procrastinate_jobs WHERE task_name LIKE 'notifications.deliver%' AND status = 'doing'),
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
            sample: dict = {"at": clock(time.time()), "emails": self.sink.count}
            try:
                todo, doing, orphans, workers, silent, activity = sql(self.url, SAMPLE)[0]
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


def keep_server_log(pg: ThrowawayPostgres, path: Path) -> None:
    if pg.log.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pg.log.read_text(errors="replace"))


def sql(url: str, query: str, params: list | dict | None = None) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def unfinished(url: str, ids: list[int] | None = None) -> int | None:
    """Notifications not yet in a final state (None while the database cannot be reached)."""
    try:
        return sql(
            url,
            "SELECT count(*) FROM notification_jobs WHERE status NOT IN ('sent', 'failed', 'cancelled')"
            " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))",
            {"ids": ids},
        )[0][0]
    except psycopg.Error:
        return None


def jobs_waiting(url: str, task_name: str = "notifications.deliver%") -> int | None:
    """Jobs of the task (a LIKE pattern: by default both e-mail tasks) not ended yet."""
    try:
        return sql(
            url,
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name LIKE %s AND status IN ('todo', 'doing')",
            [task_name],
        )[0][0]
    except psycopg.Error:
        return None


# --- Figures -----------------------------------------------------------------------------------
def clock(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="milliseconds")


def throughput(received_at: list[float], outage_started: float | None, outage_ended: float | None) -> dict:
    """E-mails per second in sliding one-second windows (0.1 s steps), before the outage and from
    its end (the database accepting writes again) until back to full throughput."""
    times = sorted(received_at)
    if not times or outage_started is None or outage_ended is None:
        return {}

    def rate(at: float) -> int:
        return count_between(times, at, at + 1.0)

    begin = times[0] + 1.0  # past the first, partial second
    before = [rate(begin + step / 10) for step in range(int((outage_started - 1.0 - begin) * 10))]
    median_before = statistics.median(before) if before else None
    after_back = [t for t in times if t >= outage_ended]
    result = {
        "outage_seconds": outage_ended - outage_started,
        "median_before": median_before,
        "delivered_during_outage": count_between(times, outage_started, outage_ended),
        "first_after_seconds": (after_back[0] - outage_ended) if after_back else None,
        "recovery_seconds": None,
        "per_second": [rate(times[0] + s) for s in range(int(times[-1] - times[0]) + 1)],
        "first_email_at": clock(times[0] + time.time() - time.monotonic()),
        "restart_at_second": outage_started - times[0],
        "back_at_second": outage_ended - times[0],
    }
    if median_before:
        step = 0
        while outage_ended + step / 10 <= times[-1]:
            if rate(outage_ended + step / 10) >= FULL_THROUGHPUT * median_before:
                # The window starts here, but full speed starts no earlier than the first e-mail.
                result["recovery_seconds"] = max(step / 10, result["first_after_seconds"] or 0.0)
                break
            step += 1
    return result


def count_between(times: list[float], start: float, end: float) -> int:
    return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def latencies(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "n/a"
    return f"{percentile(ordered, 50):,.0f} / {percentile(ordered, 99):,.0f} / {ordered[-1]:,.0f} ms"


def table(report: dict) -> str:
    header = ("figure", "value", "expected")
    body = [(f["figure"], f["value"], f["expected"]) for f in report["figures"]]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(3)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append("")
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines)


def run_bounded(name: str, budget_seconds: int, results: Path, body: Callable[[], dict]) -> int:
    """Run `body` within `budget_seconds` (SIGALRM; SIGTERM acts as Ctrl-C, so its clean-up runs),
    print its report's table, write the report to `results`. Exit status 1 when a check failed."""

    def out_of_time(signum, frame):
        raise TimeoutError(f"the {name} run went past its {budget_seconds} s budget")

    def terminated(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, out_of_time)
    signal.signal(signal.SIGTERM, terminated)
    signal.alarm(budget_seconds)
    begun = time.monotonic()
    try:
        report = body()
    finally:
        signal.alarm(0)
    report["seconds"] = round(time.monotonic() - begun, 1)
    print()
    print(table(report))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {results.relative_to(BASE_DIR)} in {report['seconds']:.0f} s; logs in {report['logs']}/")
    return 0 if report["passed"] else 1


def run_cleanup(name: str, *steps: Callable[[], object] | None) -> None:
    """Each clean-up step on its own: one failing must not leave the others' processes running."""
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except Exception as exc:
            print(f"{name}: clean-up step {step.__qualname__} failed: {exc!r}", file=sys.stderr)
