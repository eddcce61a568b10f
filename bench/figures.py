"""The figures of `make bench`, one function per group. Each returns Figure rows."""

from __future__ import annotations

import json
import tempfile
import time

import psycopg

from bench.harness import LOG_DIR, Bench, CpuMeter, Figure, free_port, percentile, port_open, server_args, wait_until
from bench.loadgen import run_load


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


# --- 1. Enqueue ----------------------------------------------------------------------------


def enqueue(bench: Bench, *, quick: bool = False) -> list[Figure]:
    from django.db import transaction

    from bench.stock_app import app as stock_app
    from bench.stock_app import stock_noop
    from bench.tasks import noop
    from jobs import job_defer, job_defer_bulk

    one_by_one = 500 if quick else 3000
    bulk_total, batch = (5000, 1000) if quick else (40000, 1000)
    bench.reset_jobs()
    floor, floor_cpu = _single_row_commits(bench, one_by_one)

    with stock_app.open():
        stock_single, stock_cpu = _timed(bench, one_by_one, lambda: [stock_noop.defer(i=i) for i in range(one_by_one)])
        begun = time.perf_counter()
        for start in range(0, bulk_total, batch):
            stock_noop.batch_defer(*({"i": i} for i in range(start, start + batch)))
        stock_bulk = _rate(bulk_total, time.perf_counter() - begun)

    # Each in its own transaction, as a request would.
    project_single, project_cpu = _timed(bench, one_by_one, lambda: [job_defer(noop, i=i) for i in range(one_by_one)])

    def bulk() -> None:
        for start in range(0, bulk_total, batch):
            with transaction.atomic():
                job_defer_bulk(noop, [{"i": i} for i in range(start, start + batch)])

    project_bulk, bulk_cpu = _timed(bench, bulk_total, bulk)
    bench.reset_jobs()
    cpu_rows = [
        (f"CPU per job, enqueue one by one: {who}", project_cpu[n], stock_cpu[n], floor_cpu[n])
        for n, who in enumerate(("client (Django, psycopg)", "PostgreSQL"))
    ]
    return [
        Figure(
            "enqueue one by one",
            project_single,
            "jobs/s",
            "stock defer()",
            stock_single,
            ">= 3,000",
            project_single >= 3000,
            notes=f"{one_by_one} jobs, jobs.job_defer, one transaction each",
        ),
        *(
            Figure(
                name,
                ours,
                "us",
                "stock defer()",
                stock,
                notes=f"from /proc; the floor's INSERT transaction: {floor_us:,.1f} us (the one client is serial:"
                " its CPU, PostgreSQL's and the commit's flush add up to each job's time)",
            )
            for name, ours, stock, floor_us in cpu_rows
        ),
        Figure(
            "PostgreSQL alone: single-row INSERT commits, 1 client",
            floor,
            "tx/s",
            notes="the floor under one-by-one enqueue on this server and disk: the same number of"
            " one-row INSERTs into an unindexed table, each its own transaction (synchronous commit),"
            " one psycopg connection",
        ),
        Figure(
            "enqueue in bulk",
            project_bulk,
            "jobs/s",
            "stock batch_defer()",
            stock_bulk,
            ">= 60,000",
            project_bulk >= 60000,
            notes=f"{bulk_total} jobs in batches of {batch}, jobs.job_defer_bulk",
        ),
        Figure(
            "CPU per job, enqueue in bulk: client / PostgreSQL",
            bulk_cpu[0] + bulk_cpu[1],
            "us",
            notes=f"{bulk_cpu[0]:,.1f} us of the client, {bulk_cpu[1]:,.1f} us of PostgreSQL",
        ),
    ]


def _timed(bench: Bench, count: int, run) -> tuple[float, tuple[float, float]]:
    """`run()`'s rate for `count` jobs, and the CPU per job of this process and of PostgreSQL."""
    meter = CpuMeter(postgres=bench.postmaster_pid()).start()
    client, begun = time.process_time(), time.perf_counter()
    run()
    elapsed, client = time.perf_counter() - begun, time.process_time() - client
    postgres = meter.stop().get("postgres", 0.0)
    return _rate(count, elapsed), (client * 1e6 / count, postgres * 1e6 / count)


def _single_row_commits(bench: Bench, count: int) -> tuple[float, tuple[float, float]]:
    """What the server and its disk allow one client: one-row INSERT transactions per second,
    and their CPU per transaction (this process, PostgreSQL)."""
    with psycopg.connect(bench.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_floor (n integer)")  # logged: each commit waits for the WAL flush
        try:
            insert = "INSERT INTO bench_floor VALUES (%s)"
            return _timed(bench, count, lambda: [conn.execute(insert, [n]) for n in range(count)])
        finally:
            conn.execute("DROP TABLE bench_floor")


# --- 2. End-to-end processing --------------------------------------------------------------


# The first job of the task still to run from a given id on, by the primary key: jobs end roughly
# in id order, so each poll reads the few rows that ended since the last one, not the whole
# table (a partial index of waiting jobs holds every finished job's dead entry until vacuum).
_FIRST_LEFT = """
SELECT id FROM procrastinate_jobs
 WHERE id >= %(after)s AND task_name = %(task)s AND status IN ('todo', 'doing')
 ORDER BY id LIMIT 1
"""
READY_POLL_SECONDS = 0.005  # the worker's row appearing
DONE_POLL_SECONDS = 0.01  # the N-th completion: the client-timed figure is late by this much at most


def _poll(conn, query: str, timeout: float, interval: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.execute(query).fetchone()[0]:
            return True
        time.sleep(interval)
    return False


def _poll_none_left(conn, task_name: str, timeout: float, interval: float) -> bool:
    deadline, after = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        row = conn.execute(_FIRST_LEFT, {"after": after, "task": task_name}).fetchone()
        if row is None:
            return True
        after = row[0]
        time.sleep(interval)
    return False


def drain(
    bench: Bench,
    task_name: str,
    total: int,
    start_worker,
    timeout: float = 180,
    stock: bool = False,
    processes: int = 1,
) -> dict:
    """Start `processes` workers on `total` queued jobs and time them as the peers are timed: on
    the client's clock from the moment the last of them is ready (its row in
    procrastinate_workers, written once it is connected, just before its first claim) to the
    moment nothing of the task is left to run. Meanwhile the CPU time of the workers (and any
    children) and of every PostgreSQL process. With several processes the first ones may finish
    jobs while the last one starts: those are left out of the rates and the per-job CPU."""
    import psycopg

    bench.sql("ANALYZE procrastinate_jobs", stock=stock)  # as autovacuum would have by now in production
    statements = bench.statements_reset(stock=stock)
    postmaster = bench.postmaster_pid()
    with psycopg.connect(bench.stock_url if stock else bench.url, autocommit=True) as conn:
        workers = [start_worker() for _ in range(processes)]
        ready = f"SELECT count(*) >= {int(processes)} FROM procrastinate_workers"
        if not _poll(conn, ready, 60, READY_POLL_SECONDS):
            raise TimeoutError(f"{task_name}: not {processes} workers registered after 60 s")
        roots = {f"worker{n}": worker.pid for n, worker in enumerate(workers)}
        meter = CpuMeter(**roots, postgres=postmaster).start()
        begun = time.monotonic()
        early = total - (bench.remaining(task_name, stock=stock) if processes > 1 else total)
        done = _poll_none_left(conn, task_name, timeout, DONE_POLL_SECONDS)
        seconds = time.monotonic() - begun
        cpu = meter.stop()
    if not done:
        left = bench.remaining(task_name, stock=stock)
        raise TimeoutError(f"{task_name}: {left} of {total} jobs left after {timeout:.0f} s")
    finished, span = bench.processing_span(task_name, stock=stock)
    timed = finished - early
    worker_seconds = [cpu[name] for name in roots if name in cpu]
    return {
        "jobs": finished,
        "timed_jobs": timed,
        "client_rate": _rate(timed, seconds),
        "database_rate": _rate(finished, span),
        "worker_us": sum(worker_seconds) * 1e6 / timed if len(worker_seconds) == len(roots) and timed else None,
        "postgres_us": meter.us_per_job("postgres", timed),
        "statements": bench.top_statements(finished, stock=stock) if statements else None,  # since the reset: all jobs
    }


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def _statements_note(statements: list[dict] | None) -> str:
    if statements is None:
        return "pg_stat_statements not loaded on this server: no per-statement figures"
    lines = [
        f"{s['us_per_job']:>7.1f} + {s['plan_us_per_job']:>5.1f} us/job  {s['calls']:>6} calls {s['plans']:>6} plans"
        f"  {s['query'][:90]}"
        for s in statements
    ]
    return "top statements, execution + planning time (pg_stat_statements):\n      " + "\n      ".join(lines)


CPU_BUDGET_US = 2 * 1e6 / 4000  # two cores at 4,000 jobs/s: what a job may cost, worker and server together


def processing(bench: Bench, *, quick: bool = False) -> list[Figure]:
    from bench.stock_app import app as stock_app
    from bench.stock_app import stock_noop

    total = 3000 if quick else 20000
    bench.reset_jobs()
    with stock_app.open():
        for start in range(0, total, 1000):
            stock_noop.batch_defer(*({"i": i} for i in range(start, min(total, start + 1000))))
    stock = drain(
        bench, "bench.stock_noop", total, lambda: bench.stock_worker("--concurrency", "10"), timeout=180, stock=True
    )
    bench.stop_children()

    queue_noop_jobs(bench, total)
    ours = drain(bench, "bench.noop", total, lambda: bench.project_worker(), timeout=180, stock=False)
    bench.stop_children()
    rate = ours["client_rate"]
    both, stock_both = _sum(ours["worker_us"], ours["postgres_us"]), _sum(stock["worker_us"], stock["postgres_us"])
    return [
        Figure(
            "process queued no-op jobs, client-timed",
            rate,
            "jobs/s",
            "stock worker, concurrency 10",
            stock["client_rate"],
            ">= 4,000",
            rate >= 4000,
            notes=f"{ours['jobs']} jobs, one worker process as `make run` starts it (concurrency 10, fair claims on);"
            " from its row in procrastinate_workers to the last job's end, on the client's clock",
        ),
        Figure(
            "process queued no-op jobs, database clock",
            ours["database_rate"],
            "jobs/s",
            "stock worker, concurrency 10",
            stock["database_rate"],
            notes="the same run, first `started` event to last `succeeded` event",
        ),
        Figure(
            "CPU per job: worker process",
            ours["worker_us"],
            "us",
            "stock worker",
            stock["worker_us"],
            notes="user + system time of the worker process from /proc over the client-timed window",
        ),
        Figure(
            "CPU per job: PostgreSQL",
            ours["postgres_us"],
            "us",
            "stock",
            stock["postgres_us"],
            notes="every process of the server (backends, WAL writer, checkpointer...) from /proc; "
            + _statements_note(ours["statements"])
            + "\n    stock's "
            + _statements_note(stock["statements"]),
            extra={"statements": ours["statements"], "stock_statements": stock["statements"]},
        ),
        Figure(
            "CPU per job: worker + PostgreSQL",
            both,
            "us",
            "stock",
            stock_both,
            f"<= {CPU_BUDGET_US:,.0f} (2 cores / 4,000 jobs/s)",
            both is not None and both <= CPU_BUDGET_US,
        ),
    ]


def queue_noop_jobs(bench: Bench, total: int) -> None:
    from bench.tasks import noop

    bench.reset_jobs()
    queue_jobs(noop, total)


def queue_jobs(task, total: int, *, owners: list[int] | None = None, **options) -> None:
    """`total` jobs in bulk statements of 1,000, each in its transaction (`options` as for
    job_defer_bulk); with `owners`, the jobs go to them in turn."""
    from django.db import transaction

    from jobs import job_defer_bulk

    for start in range(0, total, 1000):
        numbers = range(start, min(total, start + 1000))
        owner_id = [owners[i % len(owners)] for i in numbers] if owners else None
        with transaction.atomic():
            job_defer_bulk(task, [{"i": i} for i in numbers], owner_id=owner_id, **options)


WORKER_COUNTS = (1, 2, 4)


def workers(bench: Bench, *, quick: bool = False) -> list[Figure]:
    """The same queued no-op jobs through 1, 2 and 4 worker processes as `make run` starts them:
    how the rate and the CPU a job costs change with the processes (issue 15)."""
    total = 2000 if quick else 20000
    runs = {}
    for processes in WORKER_COUNTS:
        queue_noop_jobs(bench, total)
        runs[processes] = drain(
            bench, "bench.noop", total, lambda: bench.project_worker(), timeout=180, stock=False, processes=processes
        )
        bench.stop_children()
    one = runs[1]
    figures_out = []
    for processes, run in runs.items():
        reference = "" if processes == 1 else "1 process"
        label = f"{processes} worker process{'es' if processes > 1 else ''}"
        figures_out += [
            Figure(
                f"{label}: queued no-op jobs, client-timed",
                run["client_rate"],
                "jobs/s",
                reference,
                None if processes == 1 else one["client_rate"],
                notes=f"{run['timed_jobs']} of {run['jobs']} jobs in the window (from the last worker's row in"
                " procrastinate_workers to the last job's end); each process concurrency 10, fair claims on",
            ),
            Figure(
                f"{label}: CPU per job, worker processes",
                run["worker_us"],
                "us",
                reference,
                None if processes == 1 else one["worker_us"],
                notes="user + system time summed over the worker processes, from /proc",
            ),
            Figure(
                f"{label}: CPU per job, PostgreSQL",
                run["postgres_us"],
                "us",
                reference,
                None if processes == 1 else one["postgres_us"],
                notes="every process of the server, from /proc; " + _statements_note(run["statements"]),
                extra={"statements": run["statements"]},
            ),
        ]
    return figures_out


# --- 3. Enqueue-to-start latency -----------------------------------------------------------


def _trickle(bench: Bench, defer_one, count: int, per_second: float) -> dict[int, tuple[float, float]]:
    """Defers `count` jobs at `per_second`; returns when each defer call began and returned (its
    commit acknowledged), by job, on the client's time.time()."""
    interval = 1 / per_second
    next_at = time.perf_counter()
    returned: dict[int, tuple[float, float]] = {}
    for i in range(count):
        sent_at = time.time()  # the client's clock just before the defer call
        defer_one(i, sent_at)
        returned[i] = (sent_at, time.time())
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))
    return returned


def _latency_run(bench: Bench, task_name: str, start_worker, defer_one, count: int, *, stock: bool) -> dict:
    """`count` jobs at 50/s into an idle, listening worker; each job's wait from just before its
    defer call (the client's time.time()) to its handler's first line (the worker's, same clock),
    which the handler appends to a file (bench/starts.py). The event rows' figure on the side."""
    from bench import starts

    bench.reset_jobs()
    path = LOG_DIR / f"starts-{task_name}-{time.time_ns()}.txt"
    worker = start_worker({"BENCH_STARTS_FILE": str(path)})
    bench.wait_workers(1, stock=stock)
    time.sleep(1)
    meter = CpuMeter(worker=worker.pid, postgres=bench.postmaster_pid()).start()
    sent = _trickle(bench, defer_one, count, 50)
    wait_until(lambda: bench.remaining(task_name, stock=stock) == 0, 30)
    meter.stop()
    bench.stop_children()
    waits = starts.read_ms(str(path))
    started = starts.read_started(str(path))
    path.unlink(missing_ok=True)
    # The split: the defer call itself (sent to returned: its statement and synchronous commit),
    # then the worker's part, from the commit's acknowledgement to the handler (negative when the
    # NOTIFY reached the worker before the acknowledgement reached the client).
    after_commit = sorted((started[i] - back) * 1000 for i, (_, back) in sent.items() if i in started)
    return {
        "handler": waits,
        "after_commit": after_commit,
        "defer_call": sorted((back - at) * 1000 for at, back in sent.values()),
        "events": bench.start_latencies_ms(task_name, stock=stock),
        # Over the trickle, idle time included; PostgreSQL's counts the client's defers too.
        "worker_us": meter.us_per_job("worker", count),
        "postgres_us": meter.us_per_job("postgres", count),
    }


def latency(bench: Bench, *, quick: bool = False) -> list[Figure]:
    from bench.stock_app import app as stock_app
    from bench.stock_app import stock_noop
    from bench.tasks import noop
    from jobs import job_defer

    count = 50 if quick else 200
    with stock_app.open():
        stock = _latency_run(
            bench,
            "bench.stock_noop",
            lambda env: bench.stock_worker("--concurrency", "10", env=env),
            lambda i, sent_at: stock_noop.defer(i=i, sent_at=sent_at),
            count,
            stock=True,
        )
    ours = _latency_run(
        bench,
        "bench.noop",
        lambda env: bench.project_worker(env=env),
        lambda i, sent_at: job_defer(noop, i=i, sent_at=sent_at),
        count,
        stock=False,
    )
    floor = _trickle_floor(bench, count)
    p50, p99 = percentile(ours["handler"], 50), percentile(ours["handler"], 99)
    events = ", ".join(
        f"{who} {percentile(run['events'], 50) or 0:.1f} / {percentile(run['events'], 99) or 0:.1f} ms"
        for who, run in (("ours", ours), ("stock", stock))
    )
    after = (percentile(ours["after_commit"], 50), percentile(ours["after_commit"], 99))
    return [
        Figure(
            "enqueue-to-start p50, handler-timed",
            p50,
            "ms",
            "stock",
            percentile(stock["handler"], 50),
            "<= 1.5 ms",
            p50 is not None and p50 <= 1.5 and len(ours["handler"]) == count,
            notes=f"{len(ours['handler'])} of {count} jobs at 50/s into an idle, listening worker; from the client's"
            " time.time() just before the defer call to the handler's first line",
        ),
        Figure(
            "enqueue-to-start p99, handler-timed",
            p99,
            "ms",
            "stock",
            percentile(stock["handler"], 99),
            "<= 3 ms",
            p99 is not None and p99 <= 3,
            notes=f"the same jobs on the database's clock (`deferred` to `started` event), p50 / p99: {events}",
        ),
        Figure(
            "enqueue-to-start p50, from the defer's return",
            after[0],
            "ms",
            "stock",
            percentile(stock["after_commit"], 50),
            notes="the worker's part of the wait: from the defer call's return (its synchronous commit"
            " acknowledged) to the handler's first line; the rest of the handler-timed figure is the defer call",
        ),
        Figure(
            "enqueue-to-start p99, from the defer's return",
            after[1],
            "ms",
            "stock",
            percentile(stock["after_commit"], 99),
        ),
        Figure(
            "CPU per trickled job: worker process",
            ours["worker_us"],
            "us",
            "stock worker",
            stock["worker_us"],
            notes="from /proc over the trickle (idle time between the jobs included)",
        ),
        Figure(
            "CPU per trickled job: PostgreSQL",
            ours["postgres_us"],
            "us",
            "stock",
            stock["postgres_us"],
            notes="every server process over the trickle, the client's defers included",
        ),
        Figure(
            "the defer call of those jobs, p50",
            percentile(ours["defer_call"], 50),
            "ms",
            "stock",
            percentile(stock["defer_call"], 50),
            notes="job_defer in its own transaction, with its synchronous commit (the disk's fdatasync)",
        ),
        Figure(
            "PostgreSQL alone at 50/s: a one-row INSERT commit, p50 / p99",
            floor["insert"][0],
            "ms",
            notes=f"p99 {floor['insert'][1]:.2f} ms; a SELECT 1 round trip at 50/s: p50 / p99"
            f" {floor['select'][0]:.2f} / {floor['select'][1]:.2f} ms (back to back: {floor['select_busy']:.2f} ms)."
            " The floor under the defer call of a trickle: between two jobs the client, its server process and"
            " the worker fall idle, and each wakes up for every hop",
        ),
    ]


def _trickle_floor(bench: Bench, count: int) -> dict[str, tuple[float, float] | float]:
    """What the machine gives a trickle at 50/s, timed as the defers are: a one-row INSERT commit
    into an unindexed table (as `_single_row_commits`) and a SELECT 1 round trip, p50 and p99."""
    timings: dict[str, list[float]] = {"insert": [], "select": []}
    with psycopg.connect(bench.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_trickle_floor (n integer)")
        try:
            for name, statement in (("insert", "INSERT INTO bench_trickle_floor VALUES (%s)"), ("select", "SELECT %s")):

                def timed(i: int, _sent_at: float, statement=statement, name=name) -> None:
                    begun = time.perf_counter()
                    conn.execute(statement, [i])
                    timings[name].append((time.perf_counter() - begun) * 1000)

                _trickle(bench, timed, count, 50)
            begun = time.perf_counter()
            for i in range(count):
                conn.execute("SELECT %s", [i])
            busy = (time.perf_counter() - begun) * 1000 / count
        finally:
            conn.execute("DROP TABLE bench_trickle_floor")
    out: dict[str, tuple[float, float] | float] = {
        name: (percentile(sorted(values), 50), percentile(sorted(values), 99)) for name, values in timings.items()
    }
    out["select_busy"] = busy
    return out


# --- 4. HTTP under load --------------------------------------------------------------------


def http_load(bench: Bench, *, quick: bool = False) -> list[Figure]:
    """200 requests/s spread over 50 users (4/s each, under the default per-user throttle of
    600/min, so the throttle's counting is part of what is measured)."""
    from rest_framework.authtoken.models import Token

    from notifications.models import Recipient
    from tests.factories import make_user

    rate, seconds, users = 200, (5 if quick else 20), 50
    clients = []
    for n in range(users):
        user = make_user(f"bench-http-{n}-{time.time_ns()}")
        token = Token.objects.create(user=user).key
        recipient = Recipient.objects.create(owner=user, name="Load", email=f"load{n}@example.com")
        clients.append(({"Authorization": f"Token {token}", "Content-Type": "application/json"}, recipient.id))
    port = free_port()
    server = bench.spawn(*server_args(port))
    if not wait_until(lambda: port_open(port), 30):
        raise TimeoutError("gunicorn did not start")
    endpoints = {
        "POST /api/notes/": lambda recipient_id: {
            "content": "Load test note about #postgres queues https://example.com"
        },
        "POST /api/notifications/send-email/": lambda recipient_id: {
            "recipient_id": recipient_id,
            "subject": "Load",
            "body": "Hello from the load test",
        },
    }
    figures_out = []
    for name, make_body in endpoints.items():
        path = name.split(" ", 1)[1]
        requests = [(json.dumps(make_body(recipient_id)).encode(), headers) for headers, recipient_id in clients]
        run_load(port=port, path=path, requests=requests, rate=rate, seconds=3)  # warm up every gunicorn worker
        meter = CpuMeter(web=server.pid, postgres=bench.postmaster_pid()).start()
        result = run_load(port=port, path=path, requests=requests, rate=rate, seconds=seconds)
        cpu = meter.stop()
        p50, p95, p99 = (percentile(result.latencies_ms, q) for q in (50, 95, 99))
        web, postgres = (cpu.get(who, 0.0) * 1e6 / max(result.sent, 1) for who in ("web", "postgres"))
        figures_out += [
            Figure(
                f"{name} CPU per request: web + PostgreSQL",
                web + postgres,
                "us",
                notes=f"{web:,.0f} us of gunicorn's processes, {postgres:,.0f} us of PostgreSQL's, from /proc;"
                f" at {rate}/s they keep {(web + postgres) * rate / 1e6:.2f} of the 2 cores busy",
            ),
            Figure(
                f"{name} p50", p50, "ms", notes=f"{result.sent} requests at {rate}/s for {seconds} s, {users} users"
            ),
            Figure(f"{name} p95", p95, "ms"),
            Figure(f"{name} p99", p99, "ms", target="<= 25 ms", met=p99 is not None and p99 <= 25),
            Figure(
                f"{name} errors",
                float(result.errors),
                "requests",
                target="0",
                met=result.errors == 0,
                notes=f"statuses {result.statuses}",
            ),
        ]
    return figures_out


# --- 5. E-mail delivery --------------------------------------------------------------------


EMAIL_TARGET = 600  # e-mails/s, with the worker layout the docs recommend for 2 cores


def email(bench: Bench, *, quick: bool = False) -> list[Figure]:
    """The same e-mails through 1, 2 and 4 worker processes (two are the layout the docs
    recommend for 2 cores), with the CPU time per e-mail of the workers, of PostgreSQL and of the
    SMTP sink from the workers' rows to the last e-mail at the sink (issues 14 and 15). The sink
    is Postfix's smtp-sink, in C; two references in the same run: a job per e-mail
    (NOTIFICATIONS_BATCH_SIZE=1), and the Python sink (aiosmtpd in the bench's process, the
    sink of the figures before 2026-12-07), both with 2 processes."""
    from bench.peers import postfix_smtp_sink

    count = 300 if quick else 3000
    postfix = postfix_smtp_sink()
    runs = {
        processes: _email_run(bench, count=count, processes=processes, postfix=postfix) for processes in WORKER_COUNTS
    }
    references = {
        "2 worker processes, a job per e-mail": _email_run(
            bench, count=count, processes=2, postfix=postfix, batch_size=1
        ),
        "2 worker processes, the Python sink": _email_run(bench, count=count, processes=2, postfix=None),
    }
    one, two = runs[1], runs[2]
    figures_out = []
    rows = [(f"{n} worker process{'es' if n > 1 else ''}", run, None if n == 1 else one) for n, run in runs.items()]
    rows += [(label, run, two) for label, run in references.items()]
    for label, run, base in rows:
        reference = "" if base is None else ("1 process" if base is one else "2 processes")
        figures_out.append(
            Figure(
                f"e-mails delivered, {label}",
                run.value,
                "e-mails/s",
                reference,
                base.value if base else None,
                f">= {EMAIL_TARGET}" if label in {"1 worker process", "2 worker processes"} else "",
                run.met if label in {"1 worker process", "2 worker processes"} else None,
                notes=run.notes,
            )
        )
        for who, key in (("workers", "worker_us"), ("PostgreSQL", "postgres_us"), ("SMTP sink", "sink_us")):
            if run.extra[key] is None:
                continue
            notes = ""
            if key == "postgres_us":
                notes = _statements_note(run.extra["statements"]).replace("us/job", "us/e-mail")
            elif base is None:
                notes = "from /proc, every process of the tree"
            figures_out.append(
                Figure(
                    f"CPU per e-mail, {label}: {who}",
                    run.extra[key],
                    "us",
                    reference,
                    base.extra[key] if base else None,
                    notes=notes,
                    extra={"statements": run.extra["statements"]} if key == "postgres_us" else {},
                )
            )
    return figures_out


def _queue_emails(owner, count: int, *, subject: str, prefix: str) -> None:
    """`count` recipients of `owner` and one bulk-sent e-mail to each, in sends of 1,000."""
    from notifications.models import Recipient
    from notifications.services import notification_send_bulk

    recipients = Recipient.objects.bulk_create(
        [Recipient(owner=owner, name=f"{prefix.upper()}{i}", email=f"{prefix}{i}@example.com") for i in range(count)]
    )
    for start in range(0, count, 1000):
        notification_send_bulk(
            owner=owner,
            recipients=recipients[start : start + 1000],
            subject=subject,
            body="Hello",
            notification_type="system",
            priority="normal",
        )


def _email_run(bench: Bench, *, count: int, processes: int, postfix, batch_size: int | None = None) -> Figure:
    from django.test import override_settings

    from bench.peers import CountingSmtpSink, PostfixSmtpSink
    from notifications.models import DeliveryLog
    from tests.factories import make_user

    bench.reset_jobs()
    owner = make_user(f"bench-mail-{time.time_ns()}")
    with override_settings(**({} if batch_size is None else {"NOTIFICATIONS_BATCH_SIZE": batch_size})):
        _queue_emails(owner, count, subject="Bench", prefix="r")
    sink = (PostfixSmtpSink(postfix) if postfix else CountingSmtpSink()).start()
    try:
        env = {"EMAIL_URL": f"smtp://127.0.0.1:{sink.port}", "NOTIFICATIONS_RATE_PER_SECOND": "100000"}
        statements = bench.statements_reset()
        workers = [bench.project_worker("-q", "notifications", env=env) for _ in range(processes)]
        bench.wait_workers(processes, timeout=60)
        roots = {f"worker{n}": worker.pid for n, worker in enumerate(workers)}
        meter = CpuMeter(**roots, postgres=bench.postmaster_pid(), sink=sink.pid).start()
        if not wait_until(lambda: sink.count >= count, 180, interval=0.05):
            raise TimeoutError(f"{sink.count} of {count} e-mails arrived")
        cpu = meter.stop()
        top = bench.top_statements(count, limit=8) if statements else None
        span = sink.received_at[-1] - sink.received_at[0]
        sent_logs = DeliveryLog.objects.filter(notification__owner=owner, outcome="sent")
        # The last delivery log commits just after its message reaches the sink.
        wait_until(lambda: sent_logs.count() >= count, 10, interval=0.05)
        logs = sent_logs.count()
    finally:
        sink.stop()
        bench.stop_children()
    twice = len(sink.notification_ids) - len(set(sink.notification_ids))
    rate = _rate(count - 1, span)
    worker_us = sum(seconds for name, seconds in cpu.items() if name.startswith("worker")) * 1e6 / count
    postgres_us = cpu["postgres"] * 1e6 / count if "postgres" in cpu else None
    sink_us = cpu["sink"] * 1e6 / count if "sink" in cpu else None
    where = "Postfix's smtp-sink" if postfix else "aiosmtpd in the bench's process (its CPU not counted)"
    jobs = f"{batch_size or 'NOTIFICATIONS_BATCH_SIZE'} e-mails per job"
    return Figure(
        "e-mails",
        rate,
        "e-mails/s",
        met=rate >= EMAIL_TARGET and logs == count and twice == 0,
        notes=f"{count} e-mails to {where} on 127.0.0.1, {jobs}, {logs} delivery logs, {twice} sent twice,"
        " rate limit raised",
        extra={"worker_us": worker_us, "postgres_us": postgres_us, "sink_us": sink_us, "statements": top},
    )


# --- 5b. Fairness between users -----------------------------------------------------------

FAIRNESS_WAIT_LIMIT_SECONDS = 15.0  # how long the reference's last e-mail of B is waited for


def fairness(bench: Bench, *, quick: bool = False) -> list[Figure]:
    """User A has 20,000 e-mails queued; while one worker works through them, user B sends an
    e-mail every 0.2 s. How long each of B's e-mails waits to start, with fair claims (the
    default) and with JOBS_FAIR_CLAIMS=false (the reference: B waits behind A's backlog), in
    the same run. The reference waits FAIRNESS_WAIT_LIMIT_SECONDS at most after B's last
    e-mail: one still waiting then counts its wait so far (so its figure is a lower bound)."""
    backlog = 3000 if quick else 20_000
    fair_off = _fairness_run(bench, backlog=backlog, fair=False)
    fair_on = _fairness_run(bench, backlog=backlog, fair=True)
    on_p99, off_p99 = percentile(fair_on["waits"], 99), percentile(fair_off["waits"], 99)
    return [
        Figure(
            "fairness: B's e-mail wait p99",
            on_p99,
            "ms",
            "fair claims off",
            off_p99,
            "<= 1,000 ms",
            on_p99 is not None and on_p99 <= 1000,
            notes=f"{len(fair_on['waits'])} e-mails of B while A has {backlog:,} queued, 1 worker (concurrency 10);"
            f" p50 {percentile(fair_on['waits'], 50):,.0f} ms (off: {percentile(fair_off['waits'], 50):,.0f} ms,"
            f" {fair_off['censored']} still waiting after {FAIRNESS_WAIT_LIMIT_SECONDS:.0f} s)",
        ),
        Figure(
            "fairness: A's e-mails delivered meanwhile",
            fair_on["rate"],
            "e-mails/s",
            "fair claims off",
            fair_off["rate"],
            notes="A's e-mails delivered by the same worker while B sends and waits (from 200 in to the end)",
        ),
    ]


def _fairness_run(bench: Bench, *, backlog: int, fair: bool) -> dict:
    from bench.peers import CountingSmtpSink
    from notifications.models import Recipient
    from notifications.services import notification_send_email
    from tests.factories import make_user

    bench.reset_jobs()
    stamp = time.time_ns()
    user_a, user_b = make_user(f"bench-fair-a-{stamp}"), make_user(f"bench-fair-b-{stamp}")
    _queue_emails(user_a, backlog, subject="Newsletter", prefix="a")
    recipient_b = Recipient.objects.create(owner=user_b, name="B", email="b@example.com")
    sink = CountingSmtpSink().start()
    sends = 25
    try:
        env = {
            "EMAIL_URL": f"smtp://127.0.0.1:{sink.port}",
            "NOTIFICATIONS_RATE_PER_SECOND": "100000",
            "JOBS_FAIR_CLAIMS": "true" if fair else "false",
        }
        bench.project_worker("-q", "notifications", env=env)
        if not wait_until(lambda: sink.count >= 200, 60, interval=0.05):
            raise TimeoutError(f"the worker delivered {sink.count} of A's e-mails in 60 s")
        counted_from, begun = sink.count, time.monotonic()
        for i in range(sends):
            notification_send_email(
                owner=user_b,
                recipient=recipient_b,
                subject=f"Just one {i}",
                body="Hi",
                notification_type="system",
                priority="normal",
            )
            time.sleep(0.2)
        wait_until(lambda: _fairness_waiting(bench, user_b.pk) == 0, FAIRNESS_WAIT_LIMIT_SECONDS, interval=0.1)
        rate = _rate(sink.count - counted_from, time.monotonic() - begun)
        rows = bench.sql(
            """
            SELECT EXTRACT(EPOCH FROM COALESCE(s.at, now()) - d.at) * 1000, s.at IS NULL
              FROM jobs_job_info i
              JOIN procrastinate_events d ON d.job_id = i.job_id AND d.type = 'deferred'
              LEFT JOIN procrastinate_events s ON s.job_id = i.job_id AND s.type = 'started'
             WHERE i.owner_id = %s
            """,
            [user_b.pk],
        )
    finally:
        bench.stop_children()
        sink.stop()
    return {"waits": sorted(float(r[0]) for r in rows), "censored": sum(1 for r in rows if r[1]), "rate": rate}


def _fairness_waiting(bench: Bench, owner_id: int) -> int:
    return bench.scalar(
        "SELECT count(*) FROM procrastinate_jobs j JOIN jobs_job_info i ON i.job_id = j.id"
        " WHERE i.owner_id = %s AND j.status = 'todo'",
        [owner_id],
    )


# --- 6. Bulk import ------------------------------------------------------------------------


def _write_import_rows(out, *, rows: int) -> None:
    """About 150 bytes a row, a tag or two, a link, every 50th row a duplicate of the one before."""
    out.write(b"title,content,tags,external_id\n")
    for i in range(rows):
        n = i - 1 if i % 50 == 49 else i
        content = (
            f"Note {n}: notes on queues and #postgres, see https://example.com/{n} for more about batch {n // 1000}"
        )
        out.write(f'"Title {n}","{content}","bench, import",ext-{n}\n'.encode())


def imports(bench: Bench, *, quick: bool = False) -> list[Figure]:
    """A CSV uploaded through the service the API uses, imported by a real worker process on the
    `imports` queue; the worker's resident memory is sampled while it runs."""
    import psutil

    from notes.models import Note, NoteImport
    from notes.services import note_import_create
    from tests.factories import make_user

    rows = 10_000 if quick else 100_000
    bench.reset_jobs()
    owner = make_user(f"bench-import-{time.time_ns()}")
    with tempfile.TemporaryFile() as file:
        _write_import_rows(file, rows=rows)
        size = file.tell()
        file.seek(0)
        note_import = note_import_create(owner=owner, file=file, filename="bench.csv", format="csv")
    worker = psutil.Process(bench.project_worker("-q", "imports").pid)
    peak_rss = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        peak_rss = max(peak_rss, worker.memory_info().rss)
        note_import.refresh_from_db()
        if note_import.status in ("done", "failed"):
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"import not finished after 120 s ({note_import.processed} of {rows} rows)")
    seconds = (note_import.finished_at - note_import.started_at).total_seconds()
    expected = rows - rows // 50
    correct = note_import.status == "done" and Note.objects.filter(owner=owner).count() == expected
    peak_mb = peak_rss / 1024 / 1024
    return [
        Figure(
            f"bulk import of {rows:,} notes",
            seconds,
            "s",
            target="<= 20 s for 100,000",
            met=correct and seconds <= 20 * rows / 100_000,
            notes=f"{size / 1e6:.0f} MB CSV, {note_import.imported:,} imported, {note_import.duplicates:,} duplicates,"
            f" {NoteImport.objects.get(id=note_import.id).skipped} skipped; enrichment deferred in bulk",
        ),
        Figure("bulk import: worker peak RSS", peak_mb, "MB", target="<= 300 MB", met=peak_mb <= 300),
    ]


# --- 7. Digest sweep -----------------------------------------------------------------------


def digest_sweep(bench: Bench, *, quick: bool = False) -> list[Figure]:
    from datetime import time as clock_time
    from datetime import timedelta

    from django.utils import timezone

    from digests.models import RecipientDigestSchedule
    from digests.services import digest_sweep as sweep
    from notes.services import note_create
    from notifications.models import NotificationJob, Recipient
    from tests.factories import make_user

    count = 1000 if quick else 10000
    bench.reset_jobs()
    owner = make_user(f"bench-digest-{time.time_ns()}")
    for i in range(5):
        note_create(owner=owner, content=f"Digest material {i} #bench")
    recipients = Recipient.objects.bulk_create(
        [Recipient(owner=owner, name=f"D{i}", email=f"d{i}@example.com") for i in range(count)]
    )
    due = timezone.now() - timedelta(minutes=1)
    RecipientDigestSchedule.objects.bulk_create(
        [
            RecipientDigestSchedule(
                owner=owner, recipient=r, frequency="daily", delivery_time=clock_time(8), next_digest_scheduled=due
            )
            for r in recipients
        ],
        batch_size=2000,
    )
    begun = time.perf_counter()
    queued = sweep()
    seconds = time.perf_counter() - begun
    made = NotificationJob.objects.filter(owner=owner, notification_type="digest").count()
    return [
        Figure(
            "digest sweep",
            seconds,
            "s",
            target=f"<= 10 s for {count:,}",
            met=seconds <= 10 * count / 10000 and made == count,
            notes=f"{count} due schedules -> {queued} digest notifications queued ({made} rows)",
        )
    ]


# --- 8. Table health -----------------------------------------------------------------------


def table_health(bench: Bench, *, quick: bool = False) -> list[Figure]:
    rows = bench.sql(
        """
        SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid)
          FROM pg_stat_user_tables
         WHERE relname IN ('procrastinate_jobs', 'procrastinate_events', 'jobs_job_info')
         ORDER BY relname
        """
    )
    return [
        Figure(
            f"{name}: dead tuples",
            float(dead),
            "rows",
            notes=f"{live} live rows, {size / 1024 / 1024:.1f} MB with indexes",
            extra={"live": live, "bytes": size},
        )
        for name, live, dead, size in rows
    ]


GROUPS = {
    "enqueue": enqueue,
    "processing": processing,
    "workers": workers,
    "latency": latency,
    "http": http_load,
    "email": email,
    "fairness": fairness,
    "imports": imports,
    "digests": digest_sweep,
    "health": table_health,
}
