"""`make failover`: e-mails and notes through a primary that crashes and a synchronous standby that
takes over, with nothing restarted but the database. Then it counts, at the SMTP sink and on the
new primary, that nothing acknowledged was lost and nothing was sent twice.

    python -m bench.failover                        # the full run, about 3-5 minutes, at most 8
    python -m bench.failover --notifications 1000   # a quick look
    python -m bench.failover --asynchronous         # the same with an asynchronous standby
    python -m bench.failover --asynchronous --lag 2 # ... 2 s behind when the primary dies

What runs, all on 127.0.0.1 (the pieces are bench/chaos.py's, from bench/outage.py):
- two throw-away PostgreSQL clusters (tests/peers/postgres.py): a primary and its streaming
  standby, made with pg_basebackup and synchronous (synchronous_standby_names on the primary):
  every commit is answered once the standby has flushed it;
- gunicorn with the Dockerfile's settings and two `manage.py procrastinate worker` processes,
  all given one URL that lists both servers with target_session_attrs=read-write, so each
  connection goes to whichever accepts writes (docs/reliability.md#failover);
- the SMTP sink (bench/peers.py) and the fake Claude (tests/peers/claude.py) that the notes'
  enrichment calls;
- two client threads: one POSTs /api/notifications/send-email/, the other /api/notes/.

Notifications are queued up front in bulk. When half of them have been delivered, the primary
is stopped hard (`pg_ctl stop -m immediate`: a crash, no goodbye to any session), and after
--promote-after seconds (what a failover manager takes to decide) the standby is promoted.
Nobody restarts a web or worker process: they must find the new primary on their own.
With --lag (asynchronous only) the primary's WAL sender is paused (SIGSTOP) that long before
the primary is killed (SIGKILL, every process at once, so the paused sender never sends what
it holds): a standby that was that far behind, as over a slow network. Its results go to
bench/results/failover-asynchronous.json, and its checks are expected to fail. The run
ends once every notification and note is done; it is bounded by a SIGALRM budget and cleans
every process and both clusters up on any exit. Prints a table and writes
bench/results/failover.json; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil
import psycopg

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
from tests.peers.claude import FakeClaude
from tests.peers.postgres import ThrowawayPostgres

RESULTS = BASE_DIR / "bench" / "results" / "failover.json"
RESULTS_ASYNCHRONOUS = BASE_DIR / "bench" / "results" / "failover-asynchronous.json"
LOG_DIR = BASE_DIR / ".data" / "failover"
TIME_BUDGET_SECONDS = 8 * 60  # the whole run, set-up and clean-up included (5 min on a loaded 2-core machine)
DRAIN_SECONDS = 90  # after the failover: the time left for the last jobs to finish
AFTER_PROMOTION_SECONDS = 15.0  # the clients keep posting at least this long on the new primary
QUEUES = "notifications,enrichment,maintenance"
DATABASE = "secondbrain_failover"


@dataclass
class Run:
    notifications: int
    workers: int
    promote_after: float
    email_rate: float
    note_rate: float
    synchronous: bool
    lag: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    bulk_ids: list[int] = field(default_factory=list)
    killed_at: float | None = None  # monotonic: the primary stopped (immediate)
    promoted_at: float | None = None  # monotonic: the standby accepted writes
    wall: dict[str, float] = field(default_factory=dict)
    ended: float | None = None
    drained: bool = False
    notes: list[str] = field(default_factory=list)


def _multi_host_url(primary: ThrowawayPostgres, standby: ThrowawayPostgres) -> str:
    return (
        f"postgres://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{DATABASE}"
        "?target_session_attrs=read-write"
    )


def _web_processes(gunicorn) -> set[int]:
    """The gunicorn master and its worker processes: the same set at the end means no restart."""
    try:
        master = psutil.Process(gunicorn.pid)
        return {master.pid, *(child.pid for child in master.children())}
    except psutil.NoSuchProcess:
        return set()


def _notes_unfinished(url: str, ids: list[int]) -> int | None:
    try:
        return sql(
            url,
            "SELECT count(*) FROM notes WHERE id = ANY(%s) AND enrichment_status IN ('pending', 'processing')",
            [ids],
        )[0][0]
    except psycopg.Error:
        return None


def failover(run: Run) -> dict:
    primary = ThrowawayPostgres(settings={"log_checkpoints": "on"}, name="primary")
    standby: ThrowawayPostgres | None = None
    sampler: Sampler | None = None
    processes: Processes | None = None
    sink: CountingSmtpSink | None = None
    claude: FakeClaude | None = None
    clients: list[ApiClient] = []
    try:
        for old_log in LOG_DIR.glob("*.log"):
            old_log.unlink()
        print("failover: starting a primary and its standby", flush=True)
        primary.start()
        primary.create_database(DATABASE)
        standby = primary.make_standby()
        if run.synchronous:
            primary.make_synchronous(standby)
        url = _multi_host_url(primary, standby)
        sink = CountingSmtpSink().start()
        claude = FakeClaude().start()
        env = {
            **service_env(url, sink, "failover"),
            "ANTHROPIC_API_KEY": "failover-run",
            "ANTHROPIC_BASE_URL": claude.base_url,
            "LLM_MONTHLY_BUDGET_USD": "1000000",
            "LLM_DAILY_BUDGET_USD_PER_USER": "0",
        }
        os.environ.update(env)
        print(f"failover: queueing {run.notifications:,} notifications (replicated as they commit)", flush=True)
        run.bulk_ids, token, recipient_id = prepare(run.notifications, name="failover")

        processes = Processes(env, log_dir=LOG_DIR, queues=QUEUES)
        port = free_port()
        gunicorn = processes.start_gunicorn(port)
        if not wait_until(lambda: port_open(port), 30):
            raise TimeoutError("gunicorn did not start")
        for number in range(run.workers):
            processes.start_worker(f"worker-{number + 1}")
        time.sleep(2)  # gunicorn's workers forked
        web_before = _web_processes(gunicorn)
        workers_before = {name: p.pid for name, p in processes.workers.items()}
        clients = [
            ApiClient(port=port, token=token, rate=run.email_rate, body=send_email_request(recipient_id)),
            ApiClient(
                port=port,
                token=token,
                rate=run.note_rate,
                path="/api/notes/",
                body=lambda number: {"content": f"Failover note {number}: #ops the standby takes over"},
                accepted=201,
                id_key="id",
                name="notes-client",
            ),
        ]
        for client in clients:
            client.start()
        sampler = Sampler(url, sink)
        sampler.start()
        run.started_at = time.monotonic()
        print(f"failover: {run.workers} workers and the web on {url}", flush=True)

        deadline = run.started_at + TIME_BUDGET_SECONDS - DRAIN_SECONDS - 90
        while True:
            now = time.monotonic()
            if now > deadline:
                run.notes.append("the run ran out of time before every notification ended")
                break
            if run.killed_at is None and sink.count >= run.notifications // 2:
                if run.lag:
                    print(f"failover: the standby falls behind for {run.lag:g} s", flush=True)
                    run.wall["replication paused"] = time.time()
                    primary.pause_replication()
                    time.sleep(run.lag)
                print(f"failover: stopping the primary hard ({sink.count:,} e-mails delivered)", flush=True)
                run.wall["killed"] = time.time()
                run.killed_at = time.monotonic()
                if run.lag:
                    primary.kill()
                else:
                    primary.stop("immediate")
                time.sleep(run.promote_after)
                run.wall["promoting"] = time.time()
                run.promoted_at = standby.promote()
                run.wall["promoted"] = time.time()
                print(f"failover: the standby took writes {run.promoted_at - run.killed_at:.1f} s after", flush=True)
            if (
                run.promoted_at is not None
                and now >= run.promoted_at + AFTER_PROMOTION_SECONDS
                and unfinished(url, run.bulk_ids) == 0
            ):
                break
            time.sleep(0.2)
        for client in clients:
            client.stop()
        run.ended = time.monotonic()
        print("failover: clients stopped; draining", flush=True)
        notes = clients[1].log.acknowledged
        run.drained = wait_until(
            lambda: (
                unfinished(url) == 0
                and jobs_waiting(url) == 0
                and jobs_waiting(url, "notes.enrich") == 0
                and _notes_unfinished(url, notes) == 0
            ),
            DRAIN_SECONDS,
            interval=0.5,
        )
        restarted = {
            "web": web_before != _web_processes(gunicorn),
            "workers": {n: p.pid for n, p in processes.workers.items()} != workers_before
            or any(p.poll() is not None for p in processes.workers.values()),
        }
        processes.stop_all()
        time.sleep(0.5)  # the sink has answered the last messages' final dot
        sampler.stop()
        report = _report(run, url, sink, clients, restarted)
        report["details"]["samples"] = sampler.samples
        return report
    finally:
        run_cleanup(
            "failover",
            sampler.stop if sampler is not None else None,
            processes.stop_all if processes is not None else None,
            *(client.stop for client in clients),
            sink.stop if sink is not None else None,
            claude.stop if claude is not None else None,
            lambda: keep_server_log(primary, LOG_DIR / "postgres-primary.log"),
            (lambda: keep_server_log(standby, LOG_DIR / "postgres-standby.log")) if standby is not None else None,
            standby.destroy if standby is not None else None,
            primary.destroy,
        )


# --- The checks and the figures ----------------------------------------------------------------
def _report(run: Run, url: str, sink: CountingSmtpSink, clients: list[ApiClient], restarted: dict) -> dict:
    emails, notes = clients
    status_of = dict(sql(url, "SELECT id, status FROM notification_jobs"))
    by_status = collections.Counter(status_of.values())
    job_states = dict(
        sql(
            url,
            "SELECT status::text, count(*) FROM procrastinate_jobs"
            " WHERE task_name LIKE 'notifications.deliver%%' OR task_name = 'notes.enrich' GROUP BY status",
        )
    )
    note_status = dict(sql(url, "SELECT id, enrichment_status FROM notes WHERE id = ANY(%s)", [notes.log.acknowledged]))
    [[in_recovery, version]] = sql(url, "SELECT pg_is_in_recovery(), current_setting('server_version')")
    # Jobs started more than once, by task, with their events: a retry, a snooze (the notes'
    # per-user concurrency limit), a claim re-queued after its answer was lost, a rescue.
    reran = sql(
        url,
        """
        SELECT j.task_name, j.id,
               (SELECT json_agg(e.type ORDER BY e.id) FROM procrastinate_events e WHERE e.job_id = j.id)
          FROM procrastinate_jobs j
         WHERE (SELECT count(*) FROM procrastinate_events e WHERE e.job_id = j.id AND e.type = 'started') > 1
         ORDER BY j.id
        """,
    )
    reruns = collections.Counter(task for task, _, _ in reran)

    received = collections.Counter(sink.notification_ids)
    twice = sorted(i for i, n in received.items() if n > 1)
    lost = sorted(i for i in status_of if i not in received)
    unknown = sorted(i for i in received if i not in status_of)  # delivered, then its row was lost
    acknowledged = emails.log.acknowledged
    acknowledged_missing = sorted(i for i in acknowledged if i not in status_of)  # a 202 whose row is gone
    acknowledged_lost = sorted(i for i in acknowledged if received[i] == 0)
    acknowledged_twice = sorted(i for i in acknowledged if received[i] > 1)
    notes_missing = sorted(i for i in notes.log.acknowledged if i not in note_status)
    notes_not_done = sorted(i for i, s in note_status.items() if s != "done")
    not_sent = sorted(i for i, status in status_of.items() if status != "sent")
    unfinished_jobs = job_states.get("todo", 0) + job_states.get("doing", 0)
    counts = {client.name: client.counts() for client in clients}
    server_errors = sum(c[0] for c in counts.values())
    hangs = sum(c[1] for c in counts.values())

    killed, promoted = run.killed_at, run.promoted_at
    around = throughput(sink.received_at, killed, promoted)

    def since_kill(at: float | None) -> float | None:
        return None if at is None or killed is None else at - killed

    first_email = next((t for t in sorted(sink.received_at) if promoted and t >= promoted), None)
    recovered = None if around.get("recovery_seconds") is None else promoted + around["recovery_seconds"]
    first_202 = emails.log.first("202", after=promoted) if promoted else None
    first_201 = notes.log.first("201", after=promoted) if promoted else None
    during = collections.Counter(
        outcome
        for client in clients
        for at, outcome in client.log.timeline
        if killed is not None and killed <= at <= (promoted or at) + 1
    )
    checks = {
        "the primary was stopped hard and the standby promoted": promoted is not None and not in_recovery,
        "every notification and note job is in a final state": unfinished_jobs == 0 and run.drained,
        "every e-mail at the sink has its row on the new primary": not unknown,
        "no notification lost (each one reached the sink)": not lost,
        "no e-mail sent twice": not twice,
        "every notification row says sent": not not_sent,
        "every 202 from the API is on the new primary and was delivered exactly once": not (
            acknowledged_missing or acknowledged_lost or acknowledged_twice
        ),
        "every 201 note is on the new primary and enriched": not notes_missing and not notes_not_done,
        "no 500 and no hang from the API": server_errors == 0 and hangs == 0,
        "every 503 carried Retry-After and retry_after": all(c.log.unavailable_without_hint == 0 for c in clients),
        "web and workers reconnected on their own (no process restarted)": not restarted["web"]
        and not restarted["workers"],
    }
    figures = [
        (
            "standby",
            ("synchronous" if run.synchronous else "asynchronous") + (f", {run.lag:g} s behind" if run.lag else ""),
            "synchronous",
        ),
        ("notifications queued (bulk)", f"{len(run.bulk_ids):,}", ""),
        ("e-mails / notes acknowledged by the API (202 / 201)", f"{len(acknowledged):,} / {len(note_status):,}", ""),
        ("e-mails at the sink, distinct notifications", f"{len(received):,}", f"{len(status_of):,}"),
        ("notifications lost / 202s missing on the new primary", f"{len(lost)} / {len(acknowledged_missing)}", "0 / 0"),
        ("e-mails sent twice", f"{len(twice)}", "0"),
        ("e-mails at the sink whose row the new primary does not have", f"{len(unknown)}", "0"),
        ("notes acknowledged but missing or not enriched", f"{len(notes_missing) + len(notes_not_done)}", "0"),
        (
            "jobs started more than once (deliveries / enrichments)",
            f"{reruns['notifications.deliver'] + reruns['notifications.deliver_many']:,} / {reruns['notes.enrich']:,}",
            "",
        ),
        (
            f"primary {'killed (SIGKILL)' if run.lag else 'stopped (immediate)'} -> standby takes writes",
            seconds(since_kill(promoted)),
            "",
        ),
        ("  of which the wait before promoting (--promote-after)", seconds(run.promote_after), ""),
        ("throughput before the kill (median)", f"{around.get('median_before') or 0:,.0f} e-mails/s", ""),
        (
            "kill -> first 202 (e-mail) / first 201 (note)",
            f"{seconds(since_kill(first_202))} / {seconds(since_kill(first_201))}",
            "",
        ),
        ("kill -> first e-mail delivered by a worker", seconds(since_kill(first_email)), ""),
        (f"kill -> back to full throughput (>= {FULL_THROUGHPUT:.0%} of median)", seconds(since_kill(recovered)), ""),
        (
            "API requests: accepted / 503 / 5xx / hangs / other",
            " / ".join(
                str(n)
                for n in (
                    emails.log.statuses.get("202", 0) + notes.log.statuses.get("201", 0),
                    emails.log.statuses.get("503", 0) + notes.log.statuses.get("503", 0),
                    server_errors,
                    hangs,
                    sum(c[2] for c in counts.values()),
                )
            ),
            "5xx and hangs 0",
        ),
        (
            "API requests from the kill to 1 s after the promotion: accepted / 503 / other",
            f"{during.get('202', 0) + during.get('201', 0)} / {during.get('503', 0)} / "
            f"{sum(during.values()) - during.get('202', 0) - during.get('201', 0) - during.get('503', 0)}",
            "",
        ),
        ("API latency p50 / p99 / max", latencies(emails.log.latencies_ms + notes.log.latencies_ms), "max < 5,000 ms"),
        ("run time (load + drain)", seconds((run.ended or 0) - run.started_at), ""),
    ]
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "passed": all(checks.values()),
        "checks": checks,
        "figures": [{"figure": f, "value": v, "expected": e} for f, v, e in figures],
        "settings": {
            "notifications": run.notifications,
            "workers": run.workers,
            "promote_after_seconds": run.promote_after,
            "email_rate_per_second": run.email_rate,
            "note_rate_per_second": run.note_rate,
            "synchronous_standby": run.synchronous,
            "standby_lag_seconds": run.lag,
            "url": "postgres://postgres@127.0.0.1:<primary>,127.0.0.1:<standby>/... ?target_session_attrs=read-write",
        },
        "details": {
            "notification_status": dict(by_status),
            "job_status": job_states,
            "note_status": dict(collections.Counter(note_status.values())),
            "lost_ids": lost[:100],
            "twice_ids": twice[:100],
            "unknown_ids_at_sink": unknown[:100],
            "not_sent_ids": not_sent[:100],
            "acknowledged_missing_ids": acknowledged_missing[:100],
            "acknowledged_lost_ids": acknowledged_lost[:100],
            "acknowledged_twice_ids": acknowledged_twice[:100],
            "notes_missing_ids": notes_missing[:100],
            "notes_not_done_ids": notes_not_done[:100],
            "api_statuses": {client.name: dict(client.log.statuses) for client in clients},
            "api_samples": {client.name: client.log.samples for client in clients},
            "restarted": restarted,
            "started_more_than_once": [{"task": t, "job": j, "events": e} for t, j, e in reran[:30]],
            "drained": run.drained,
            "throughput": around,
            "moments": {name: clock(at) for name, at in run.wall.items()},
            "notes": run.notes,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "postgres": version,
        "logs": str(LOG_DIR.relative_to(BASE_DIR)),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument(
        "--promote-after", type=float, default=2.0, help="seconds between the primary's crash and the promotion"
    )
    parser.add_argument("--email-rate", type=float, default=5.0, help="e-mails POSTed per second")
    parser.add_argument("--note-rate", type=float, default=3.0, help="notes POSTed per second (same user: < 600/min)")
    parser.add_argument(
        "--asynchronous", action="store_true", help="leave the standby asynchronous (what can then be lost)"
    )
    parser.add_argument(
        "--lag",
        type=float,
        default=0.0,
        help="with --asynchronous: seconds the standby falls behind before the primary is killed",
    )
    args = parser.parse_args(argv)
    if args.lag and not args.asynchronous:
        parser.error("--lag needs --asynchronous (a synchronous standby never falls behind a commit)")
    run = Run(
        notifications=args.notifications,
        workers=args.workers,
        promote_after=args.promote_after,
        email_rate=args.email_rate,
        note_rate=args.note_rate,
        synchronous=not args.asynchronous,
        lag=args.lag,
    )
    results = RESULTS_ASYNCHRONOUS if args.asynchronous else RESULTS
    return run_bounded("failover", TIME_BUDGET_SECONDS, results, lambda: failover(run))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
