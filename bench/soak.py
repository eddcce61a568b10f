"""The soak figure (issue 14, "Cost that grows with the work"): a million no-op jobs queued in
bulk, then processed by one worker process as `make run` starts it, with the retention purge
running as in production (its cron and retention set short, so it runs many times during the
run). Does the last 100,000 jobs' throughput hold against the first 100,000's, and what do the
job tables look like at the end, after the purge?

    python -m bench.run --only soak                      # 1,000,000 jobs, purge on
    python -m bench.run --only soak --soak-jobs 200000   # a quicker iteration
    python -m bench.run --only soak-kept                 # purge off: bytes per finished job kept

Too slow for the default `make bench`: run only when asked (`make soak`), with its own budget.

Progress is read along the primary key (the first job still to run; jobs of one line are
claimed in id order), not from the event rows: the purge deletes those as it goes.
"""

from __future__ import annotations

import time

from bench.figures import queue_jobs
from bench.harness import Bench, CpuMeter, Figure, wait_until

SOAK_JOBS = 1_000_000
WINDOW_JOBS = 100_000  # the first and the last this many jobs are compared
RATIO_TARGET = 0.90
BUDGET_SECONDS = 60 * 60  # each soak group's own time budget (bench/run.py)
# The purge as in production (the worker's periodic `jobs.purge`, jobs/tasks.py), every 20 s
# with a 30 s retention instead of every 5 minutes with an hour's.
PURGE_ENV = {"JOBS_RETENTION_CRON": "* * * * * */20", "JOBS_SUCCEEDED_RETENTION_SECONDS": "30"}
# Purge off: the periodic task stays registered but its cron comes round once a year.
KEPT_ENV = {"JOBS_RETENTION_CRON": "0 0 1 1 *"}
PROGRESS_POLL_SECONDS = 0.2
SAMPLE_SECONDS = 15.0  # the tables' dead tuples and sizes during the run
TASK = "bench.noop"

# The first job still to run from a given id on (as bench/figures.py's completion poll).
_FIRST_LEFT = """
SELECT id FROM procrastinate_jobs
 WHERE id >= %(after)s AND task_name = %(task)s AND status IN ('todo', 'doing')
 ORDER BY id LIMIT 1
"""

_TABLES = """
SELECT s.relname, s.n_live_tup, s.n_dead_tup, pg_relation_size(s.relid), pg_indexes_size(s.relid),
       pg_total_relation_size(s.relid), s.autovacuum_count, s.autoanalyze_count, s.n_tup_del,
       (SELECT count(*) FROM pg_index i WHERE i.indrelid = s.relid)
  FROM pg_stat_user_tables s
 WHERE s.relname LIKE 'procrastinate\\_%%' OR s.relname LIKE 'jobs\\_%%'
 ORDER BY pg_total_relation_size(s.relid) DESC, s.relname
"""


def _tables(bench: Bench) -> dict[str, dict]:
    keys = ("live", "dead", "heap", "indexes", "total", "autovacuums", "autoanalyzes", "deleted", "index_count")
    return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in bench.sql(_TABLES)}


def _statements(bench: Bench) -> dict[int, tuple[str, int, float]]:
    """{queryid: (query, calls, execution + planning ms)} of the bench database, or {}."""
    import psycopg

    try:
        rows = bench.sql(
            """
            SELECT queryid, regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time + total_plan_time
              FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
            """
        )
    except psycopg.Error:
        return {}
    return {queryid: (query, calls, ms) for queryid, query, calls, ms in rows}


def _statement_kind(query: str) -> str:
    if "candidates AS" in query:
        return "claim"
    if "doomed AS" in query:
        return "purge"
    if "finished AS" in query:
        return "completions"
    return "other"


def _statements_per_job(before: dict, after: dict, jobs: int) -> dict[str, float]:
    """µs per job by kind of statement (claim, completions, purge, other) between two snapshots."""
    out: dict[str, float] = {}
    for queryid, (query, _, ms) in after.items():
        spent = ms - (before[queryid][2] if queryid in before else 0.0)
        kind = _statement_kind(query)
        out[kind] = out.get(kind, 0.0) + spent * 1000 / max(jobs, 1)
    return {kind: round(us, 1) for kind, us in sorted(out.items(), key=lambda kv: -kv[1])}


class _Window:
    """One stretch of the run (the first or the last WINDOW_JOBS jobs): its clock, its CPU and
    its statements, from `open` to `close`."""

    def __init__(self, bench: Bench, roots: dict[str, int | None]) -> None:
        self.bench, self.roots = bench, roots
        self.begun = self.ended = None
        self.statements: dict[str, float] = {}

    def open(self, at: float) -> None:
        self.begun = at
        self.meter = CpuMeter(**self.roots).start()
        self._statements = _statements(self.bench)

    def close(self, at: float, jobs: int) -> None:
        self.ended = at
        self.cpu = self.meter.stop()
        self.jobs = jobs
        self.statements = _statements_per_job(self._statements, _statements(self.bench), jobs)

    @property
    def rate(self) -> float:
        return self.jobs / (self.ended - self.begun) if self.ended and self.ended > self.begun else 0.0

    def us_per_job(self, name: str) -> float | None:
        return self.meter.us_per_job(name, self.jobs)


def _run(bench: Bench, *, total: int, purge: bool) -> dict:
    """Queue `total` no-op jobs, drain them through one worker process, follow the progress
    along the primary key and open/close the first and last windows as their jobs pass."""
    import psycopg

    from bench.tasks import noop

    bench.reset_jobs()
    window = min(WINDOW_JOBS, total // 2)
    begun = time.monotonic()
    queue_jobs(noop, total)
    enqueue_seconds = time.monotonic() - begun
    bench.sql("ANALYZE procrastinate_jobs")  # as autovacuum would have by now in production
    first_id, last_id = bench.sql(f"SELECT min(id), max(id) FROM procrastinate_jobs WHERE task_name = '{TASK}'")[0]
    statements = bench.statements_reset()
    before = _tables(bench)
    worker = bench.project_worker(env=PURGE_ENV if purge else KEPT_ENV)
    roots = {"worker": worker.pid, "postgres": bench.postmaster_pid()}
    first, last = _Window(bench, roots), _Window(bench, roots)
    samples: list[dict] = []
    with psycopg.connect(bench.url, autocommit=True) as conn:
        if not wait_until(lambda: conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0], 60, 0.005):
            raise TimeoutError("soak: no worker registered after 60 s")
        ready = time.monotonic()
        whole = CpuMeter(**roots).start()
        first.open(ready)
        after, next_sample = first_id, ready
        previous = (0, _statements(bench))  # jobs done and the statements at the last sample
        deadline = ready + BUDGET_SECONDS
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"soak: {last_id - after + 1} of {total} jobs left after {BUDGET_SECONDS} s")
            row = conn.execute(_FIRST_LEFT, {"after": after, "task": TASK}).fetchone()
            after = row[0] if row else last_id + 1
            done = after - first_id  # jobs end in id order, give or take the ten in flight
            if first.ended is None and done >= window:
                first.close(now, done)
            if last.begun is None and done >= total - window:
                last.open(now)
                last_from = done
            if row is None:
                last.close(now, total - last_from)
                break
            if now >= next_sample:
                snapshot = _statements(bench)
                claim = _statements_per_job(previous[1], snapshot, done - previous[0]).get("claim")
                samples.append({"s": round(now - ready, 1), "done": done, "claim_us": claim, **_sample(bench)})
                previous, next_sample = (done, snapshot), now + SAMPLE_SECONDS
            time.sleep(PROGRESS_POLL_SECONDS)
        processing_seconds = time.monotonic() - ready
        whole_cpu = whole.stop()
    finished_span = None
    if not purge:  # the events are all there: the database's view of the first and last windows
        finished_span = _database_windows(bench, window)
    purge_wait = None
    if purge:
        # "After the purge": the worker keeps running until its purge has deleted every job of
        # the run (the last ones once they are 30 s old).
        waited = time.monotonic()
        left = "SELECT count(*) FROM procrastinate_jobs WHERE task_name = %s"
        if not wait_until(lambda: bench.scalar(left, [TASK]) == 0, 300, 1.0):
            raise TimeoutError(f"soak: {bench.scalar(left, [TASK])} finished jobs not purged after 300 s")
        purge_wait = time.monotonic() - waited
    top = _statements_per_job({}, _statements(bench), total) if statements else {}
    bench.stop_children()  # its backends exit and flush their table statistics
    time.sleep(1.5)
    tables = _tables(bench)
    return {
        "total": total,
        "window": window,
        "enqueue_seconds": enqueue_seconds,
        "processing_seconds": processing_seconds,
        "purge_wait": purge_wait,
        "first": first,
        "last": last,
        "whole_cpu": whole_cpu,
        "statements": top,
        "samples": samples,
        "before": before,
        "tables": tables,
        "counts": {name: bench.scalar(f'SELECT count(*) FROM "{name}"') for name in tables},
        "database_windows": finished_span,
    }


def _sample(bench: Bench) -> dict:
    """procrastinate_jobs during the run: the statistics' row counts, its size, the claim index's."""
    row = bench.sql(
        "SELECT n_live_tup, n_dead_tup, pg_total_relation_size(relid), pg_relation_size('jobs_fair_claim_idx'),"
        " autovacuum_count, n_tup_del FROM pg_stat_user_tables WHERE relname = 'procrastinate_jobs'"
    )[0]
    return dict(zip(("live", "dead", "bytes", "claim_index_bytes", "autovacuums", "deleted"), row, strict=True))


def _database_windows(bench: Bench, window: int) -> tuple[float, float]:
    """The first and the last `window` jobs' rates from their `succeeded` events, by completion
    order (the check on the primary-key progress; only while no purge deletes the events)."""
    rows = bench.sql(
        """
        SELECT EXTRACT(EPOCH FROM at) FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id
         WHERE j.task_name = %s AND e.type = 'succeeded' ORDER BY at
        """,
        [TASK],
    )
    at = [float(r[0]) for r in rows]
    if len(at) <= window:
        return 0.0, 0.0
    return window / (at[window] - at[0]), window / (at[-1] - at[-1 - window])


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:,.1f} MB"


def _table_figures(run: dict, label: str) -> list[Figure]:
    rows = []
    for name, t in run["tables"].items():
        if t["total"] < 64 * 1024 and not t["dead"]:  # the empty side tables
            continue
        t["live"] = run["counts"][name]
        b = run["before"].get(name, {})
        notes = (
            f"{t['live']:,} rows (counted); heap {_mb(t['heap'])}, {t['index_count']} indexes {_mb(t['indexes'])};"
            f" {t['autovacuums'] - b.get('autovacuums', 0)} autovacuums and"
            f" {t['autoanalyzes'] - b.get('autoanalyzes', 0)} autoanalyzes during the run"
        )
        rows += [
            Figure(f"{label}: {name} dead tuples", float(t["dead"]), "rows", notes=notes, extra=t),
            Figure(f"{label}: {name} table + indexes", t["total"] / 1024 / 1024, "MB"),
        ]
    return rows


def _run_figures(run: dict, label: str) -> list[Figure]:
    first, last = run["first"], run["last"]
    ratio = last.rate / first.rate if first.rate else 0.0
    window = run["window"]
    total = run["total"]
    whole_worker, whole_pg = (run["whole_cpu"].get(k) for k in ("worker", "postgres"))
    progress = ", ".join(
        f"{s['s']:.0f}s {s['done'] // 1000}k dead {s['dead'] // 1000}k av {s['autovacuums']} claim {s['claim_us']}"
        for s in run["samples"][::2]
    )
    rows = [
        Figure(
            f"{label}: first {window:,} jobs",
            first.rate,
            "jobs/s",
            notes=f"{total:,} no-op jobs queued in bulk in {run['enqueue_seconds']:.0f} s, one worker process as"
            " `make run` starts it; client-timed from its row in procrastinate_workers, by the primary key's progress",
        ),
        Figure(
            f"{label}: last {window:,} jobs",
            last.rate,
            "jobs/s",
            f"first {window:,}",
            first.rate,
            f">= {RATIO_TARGET:.2f}x the first",
            ratio >= RATIO_TARGET,
        ),
        Figure(
            f"{label}: wall time",
            run["processing_seconds"],
            "s",
            notes=f"processing, {total / run['processing_seconds']:,.0f} jobs/s overall;"
            f" CPU per job over the whole run: worker {whole_worker * 1e6 / total:,.0f} us,"
            f" PostgreSQL {whole_pg * 1e6 / total:,.0f} us"
            + (f"; every job purged {run['purge_wait']:.0f} s after the last one ended" if run["purge_wait"] else "")
            + "\n    progress (s, jobs done, dead tuples and autovacuums of procrastinate_jobs,"
            f" claim us/job since the sample before): {progress}",
            extra={"samples": run["samples"]},
        ),
    ]
    for who in ("worker", "postgres"):
        rows.append(
            Figure(
                f"{label}: CPU per job, last {window:,}: {'worker' if who == 'worker' else 'PostgreSQL'}",
                last.us_per_job(who),
                "us",
                f"first {window:,}",
                first.us_per_job(who),
                notes="" if who == "worker" else "whole server from /proc",
            )
        )
    rows.append(
        Figure(
            f"{label}: PostgreSQL statements per job, last {window:,}",
            sum(last.statements.values()) or None,
            "us",
            f"first {window:,}",
            sum(first.statements.values()) or None,
            notes=f"execution + planning (pg_stat_statements) by kind: first {first.statements},"
            f" last {last.statements}; over the whole run {run['statements']}",
        )
    )
    if run["database_windows"]:
        db_first, db_last = run["database_windows"]
        rows.append(
            Figure(
                f"{label}: last {window:,} jobs, database clock",
                db_last,
                "jobs/s",
                f"first {window:,}",
                db_first,
                notes="from the `succeeded` events in completion order (the check on the primary-key progress)",
            )
        )
    return rows


def soak(bench: Bench, *, quick: bool = False, jobs: int = SOAK_JOBS) -> list[Figure]:
    """`jobs` no-op jobs with the purge running: the throughput's drift and the tables after."""
    run = _run(bench, total=20_000 if quick else jobs, purge=True)
    return _run_figures(run, "soak") + _table_figures(run, "soak, after the purge")


def soak_kept(bench: Bench, *, quick: bool = False, jobs: int = SOAK_JOBS) -> list[Figure]:
    """The same with the purge off: what every finished job costs in the tables while it is kept."""
    run = _run(bench, total=20_000 if quick else jobs, purge=False)
    kept = ("procrastinate_jobs", "procrastinate_events", "jobs_job_info")
    size = sum(run["tables"][name]["total"] for name in kept if name in run["tables"])
    return [
        *_run_figures(run, "soak, purge off"),
        *_table_figures(run, "soak, purge off"),
        Figure(
            f"soak, purge off: bytes per finished job kept ({run['total']:,})",
            size / run["total"],
            "bytes",
            notes=f"{', '.join(kept)}: heap + indexes at the end over the jobs finished (issue 15's capacity model)",
        ),
    ]


GROUPS = {"soak": soak, "soak-kept": soak_kept}
