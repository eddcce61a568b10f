"""What every benchmark figure needs: the bench database, worker processes, waiting, a result row."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

BASE_DIR = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOG_DIR = BASE_DIR / ".data" / "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    reference: str = ""  # what the ratio compares against
    reference_value: float | None = None
    target: str = ""  # the target, as text
    met: bool | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.reference_value:
            return None
        return self.value / self.reference_value

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


class Bench:
    """The bench database (created afresh for each run) and the environment of its processes."""

    def __init__(self, database_url: str, stock_url: str) -> None:
        self.url = database_url
        self.stock_url = stock_url  # stock Procrastinate's own schema, nothing of ours
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "BENCH_DSN": stock_url,
            "DEBUG": "false",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "PROCRASTINATE_IMPORT_PATHS": "bench.tasks",
            "PYTHONUNBUFFERED": "1",
            # One bench user sends and enriches far more than a day's quota allows.
            "EMAIL_DAILY_QUOTA_PER_USER": "0",
            "LLM_DAILY_BUDGET_USD_PER_USER": "0",
        }
        self.env.setdefault("SECRET_KEY", "bench-" + "x" * 40)
        self.env.setdefault("EMAIL_URL", "consolemail://")  # required with DEBUG off; e-mail runs set theirs
        self.children: list[subprocess.Popen] = []

    def sql(self, query: str, params: tuple | list | dict | None = None, *, stock: bool = False) -> list[tuple]:
        with psycopg.connect(self.stock_url if stock else self.url, autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def scalar(self, query: str, params: tuple | list | dict | None = None, *, stock: bool = False):
        rows = self.sql(query, params, stock=stock)
        return rows[0][0] if rows else None

    def reset_jobs(self) -> None:
        tables = "procrastinate_events, procrastinate_jobs, procrastinate_periodic_defers, procrastinate_workers"
        self.sql(f"TRUNCATE {tables}, jobs_paused_queues, jobs_rate_limit_buckets RESTART IDENTITY CASCADE")
        self.sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE", stock=True)

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOG_DIR / "processes.log", "a") as log:  # never a pipe: a full one stalls the child
            child = subprocess.Popen(
                [PYTHON, *args], cwd=BASE_DIR, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
            )
        self.children.append(child)
        return child

    def project_worker(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """The worker exactly as `make run` and the Dockerfile start it (settings from the environment)."""
        return self.spawn("manage.py", "procrastinate", "worker", *args, env=env)

    def stock_worker(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.spawn("-m", "procrastinate", "--app=bench.stock_app.app", "worker", *args, env=env)

    def stop_children(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children = []

    def wait_workers(self, count: int, timeout: float = 30.0, *, stock: bool = False) -> None:
        query = "SELECT count(*) FROM procrastinate_workers"
        wait_until(lambda: (self.scalar(query, stock=stock) or 0) >= count, timeout)

    def remaining(self, task_name: str, *, stock: bool = False) -> int:
        return self.scalar(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = %s AND status IN ('todo', 'doing')",
            [task_name],
            stock=stock,
        )

    def processing_span(self, task_name: str, *, stock: bool = False) -> tuple[int, float]:
        """(jobs finished, seconds from the first start to the last finish), from the database's clock."""
        finished, span = self.sql(
            """
            SELECT count(*) FILTER (WHERE e.type IN ('succeeded', 'failed')),
                   EXTRACT(EPOCH FROM max(e.at) FILTER (WHERE e.type IN ('succeeded', 'failed'))
                                    - min(e.at) FILTER (WHERE e.type = 'started'))
              FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id
             WHERE j.task_name = %s
            """,
            [task_name],
            stock=stock,
        )[0]
        return finished, float(span or 0)

    def start_latencies_ms(self, task_name: str, *, stock: bool = False) -> list[float]:
        rows = self.sql(
            """
            SELECT EXTRACT(EPOCH FROM s.at - d.at) * 1000
              FROM procrastinate_jobs j
              JOIN procrastinate_events d ON d.job_id = j.id AND d.type = 'deferred'
              JOIN procrastinate_events s ON s.job_id = j.id AND s.type = 'started'
             WHERE j.task_name = %s
            """,
            [task_name],
            stock=stock,
        )
        return sorted(float(r[0]) for r in rows)

    # --- Where the CPU goes ------------------------------------------------------------------------
    def postmaster_pid(self) -> int | None:
        """The PostgreSQL server's main process, when it runs on this machine (its /proc visible)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            stat = _proc_stats().get(backend)  # while the backend is there: its parent is the server
        return stat[0] if stat is not None else None

    def statements_reset(self, *, stock: bool = False) -> bool:
        """Start pg_stat_statements afresh for this database; False where the server has not
        loaded it (shared_preload_libraries: the embedded PostgreSQL does, see scripts/devdb.py)."""
        try:
            self.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", stock=stock)
            # Planning too (off by default): a statement planned on every execution shows here.
            name = self.scalar("SELECT current_database()", stock=stock)
            self.sql(f'ALTER DATABASE "{name}" SET pg_stat_statements.track_planning = on', stock=stock)
            self.sql(
                "SELECT pg_stat_statements_reset(0, oid, 0) FROM pg_database WHERE datname = current_database()",
                stock=stock,
            )
        except psycopg.Error:
            return False
        return True

    def top_statements(self, jobs: int, *, stock: bool = False, limit: int = 5) -> list[dict]:
        """The statements of this database that took the most execution and planning time since
        `statements_reset`, with their times per job (µs); [] without pg_stat_statements."""
        try:
            rows = self.sql(
                """
                SELECT calls, total_exec_time, rows, regexp_replace(query, '\\s+', ' ', 'g'), plans, total_plan_time
                  FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 ORDER BY total_exec_time + total_plan_time DESC
                 LIMIT %s
                """,
                [limit],
                stock=stock,
            )
        except psycopg.Error:
            return []
        return [
            {
                "us_per_job": round(total_ms * 1000 / max(jobs, 1), 1),
                "plan_us_per_job": round(plan_ms * 1000 / max(jobs, 1), 1),
                "calls": calls,
                "plans": plans,
                "rows": count,
                "query": query[:160],
            }
            for calls, total_ms, count, query, plans, plan_ms in rows
        ]


class CpuMeter:
    """CPU time (user + system) of process trees from /proc, between `start()` and `stop()`.

    A tree's time is each live process's own time plus what its reaped children left in its
    cutime/cstime, so a process that exits inside the window is still counted (PostgreSQL's
    backends ending, a worker's children)."""

    def __init__(self, **roots: int | None) -> None:
        self.roots = {name: pid for name, pid in roots.items() if pid is not None}
        self._begun: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self._begun = _tree_seconds(self.roots)
        return self

    def stop(self) -> dict[str, float]:
        ended = _tree_seconds(self.roots)
        self.seconds = {name: ended[name] - self._begun[name] for name in self._begun if name in ended}
        return self.seconds

    def us_per_job(self, name: str, jobs: int) -> float | None:
        if name not in self.seconds or not jobs:
            return None
        return self.seconds[name] * 1e6 / jobs


def _proc_stats() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, clock ticks of the process and its reaped children)} of every process."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                text = file.read()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(b")") + 2 :].split()  # the name may hold spaces and parentheses
        # fields[0] is field 3 of proc(5): ppid is field 4, utime..cstime are fields 14-17.
        stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    return stats


def _tree_seconds(roots: dict[str, int]) -> dict[str, float]:
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    result = {}
    for name, root in roots.items():
        if root not in stats:
            continue
        ticks, todo = 0, [root]
        while todo:
            pid = todo.pop()
            ticks += stats[pid][1]
            todo.extend(children.get(pid, []))
        result[name] = ticks / CLOCK_TICKS
    return result


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def gunicorn_args() -> list[str]:
    """The Dockerfile's GUNICORN_CMD_ARGS, so a run serves exactly like the image does."""
    for line in (BASE_DIR / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV GUNICORN_CMD_ARGS="):
            return shlex.split(line.split("=", 1)[1].strip().strip('"'))
    raise RuntimeError("no GUNICORN_CMD_ARGS in the Dockerfile")


def server_args(port: int) -> list[str]:
    """The Dockerfile's server command (CMD and GUNICORN_CMD_ARGS) as arguments of `python`, bound
    to 127.0.0.1:port instead of 0.0.0.0:8000: the bench, the chaos run and the tests serve
    exactly as the image does."""
    for line in (BASE_DIR / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            command = json.loads(line.removeprefix("CMD "))
            break
    else:
        raise RuntimeError("no CMD in the Dockerfile")
    if command[0] != "gunicorn":
        raise RuntimeError(f"the Dockerfile's CMD is not gunicorn: {command}")
    args = command[1:]
    args[args.index("--bind") + 1] = f"127.0.0.1:{port}"
    return ["-m", "gunicorn", *args, *gunicorn_args()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
