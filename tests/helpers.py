"""Helpers for tests (fixtures are in conftest.py): API clients, workers in this process or as
their own processes, reads of Procrastinate's tables, and waiting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
from django.db import connection
from procrastinate.contrib.django import app
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.peers.smtp import SmtpSink

T = TypeVar("T")

BASE_DIR = Path(__file__).resolve().parent.parent
PROCRASTINATE_TABLES = (
    "procrastinate_events, procrastinate_jobs, procrastinate_periodic_defers, procrastinate_workers,"
    " jobs_batch_watches,"  # raw SQL too (migration 0010)
    " jobs_concurrency_slots"  # ours, filled by triggers that a TRUNCATE of the jobs does not fire
)

# Procrastinate's own status transitions from `todo`: a job row moved along one writes the events
# (through Procrastinate's triggers) that a worker would.
JOB_STATUS_PATHS = {
    "todo": [],
    "doing": ["doing"],
    "succeeded": ["doing", "succeeded"],
    "failed": ["doing", "failed"],
    "aborted": ["doing", "aborted"],
    "cancelled": ["cancelled"],
}


def client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def smtp_env(sink: SmtpSink, **extra: str) -> dict[str, str]:
    """Environment for a worker process that delivers to `sink`."""
    return {"EMAIL_URL": f"smtp://127.0.0.1:{sink.port}", "NOTIFICATIONS_RATE_PER_SECOND": "1000", **extra}


def run_worker(queues: list[str] | None = None, concurrency: int = 1) -> None:
    """Run a real Procrastinate worker until no job is ready now, then return.

    Like `manage.py procrastinate worker`, it runs on its own psycopg connection, so it only
    sees committed rows: use it in transactional tests.
    """
    with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
        worker_app.run_worker(
            queues=queues, wait=False, install_signal_handlers=False, listen_notify=False, concurrency=concurrency
        )


def jobs(task_name: str | None = None) -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, task_name, queue_name, status, args, attempts, scheduled_at, lock, queueing_lock"
            " FROM procrastinate_jobs WHERE %(t)s::text IS NULL OR task_name = %(t)s ORDER BY id",
            {"t": task_name},
        )
        columns = [c.name for c in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:  # Django's cursor leaves jsonb as text
        row["args"] = json.loads(row["args"]) if isinstance(row["args"], str) else row["args"]
    return rows


def database_url() -> str:
    """The URL of the test database this test process uses (per xdist worker)."""
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def start_worker_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python manage.py procrastinate worker ...` against the test database, as its own process."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "procrastinate", "worker", *args],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"  # Debian's `faketime` package


def skewed_clock_env(offset: str) -> dict[str, str]:
    """Environment for a process whose clock is `offset` off the real one ("+30s", "+10m", "-40d"), with
    libfaketime preloaded; checked on a first process, so a test can never pass unskewed.
    The monotonic clock is left alone (timeouts and asyncio keep working), but then time.sleep
    fails with EINVAL in such a process: a job it runs must not sleep."""
    if not Path(LIBFAKETIME).exists():
        pytest.skip("libfaketime is missing: apt-get install faketime")
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}
    seen = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    shift = float(seen.stdout) - time.time()
    assert abs(shift - _offset_seconds(offset)) < 10, f"libfaketime moved the clock by {shift:.0f} s, not {offset}"
    return env


def _offset_seconds(offset: str) -> float:
    """FAKETIME's relative offset ("+30s", "-10m", "+40d") in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(offset[:-1]) * units[offset[-1]]


def wait_for(predicate, *, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_move(job_id: int, status: str) -> None:
    """Move a `todo` job to `status` along JOB_STATUS_PATHS."""
    with connection.cursor() as cursor:
        for step in JOB_STATUS_PATHS[status]:
            cursor.execute("UPDATE procrastinate_jobs SET status = %s WHERE id = %s", [step, job_id])


def stop_worker(process: subprocess.Popen, *, timeout: float = 20.0) -> str:
    """SIGTERM, wait for the exit, return the output (for assertion messages)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


def kill_worker(process: subprocess.Popen) -> None:
    """SIGKILL, as a crash would (no shutdown, nothing told to the database); wait until it is gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(10)


def at_once(count: int, call: Callable[[], T], *, timeout: float = 30.0) -> list[T]:
    """Run `call` in `count` threads released together, to race them. Returns what the calls
    returned (one that raised is missing: compare the length). Each thread closes its own
    database connection."""
    start = threading.Barrier(count)
    results: list[T] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            start.wait(timeout)
            value = call()
            with lock:
                results.append(value)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


# --- Event streams (tests/jobs/test_stream.py, test_batch_stream.py; the server: conftest's asgi_server)


class SseClient:
    """Reads an event stream line by line in a thread; events land in a queue as (event, data).

    Plain HTTP/1.0 on its own socket, so the test can drop the connection like a closed tab."""

    def __init__(self, base_url: str, path: str, token: str) -> None:
        parts = urlsplit(base_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.sock.sendall(
            f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nAuthorization: Token {token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        self.events: queue.Queue = queue.Queue()
        self.received: list[tuple[str, dict]] = []
        self.comments = 0
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            stream = self.sock.makefile("rb")
            self.status = int(stream.readline().split()[1])
            while (header := stream.readline().decode().rstrip("\r\n")) != "":
                name, _, value = header.partition(":")
                self.headers[name.lower()] = value.strip()
            kind, data = None, []
            while line := stream.readline():
                line = line.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.comments += 1
                elif line == "":
                    if data:
                        self.events.put((kind or "message", json.loads("\n".join(data))))
                    kind, data = None, []
                else:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "event":
                        kind = value
                    elif field == "data":
                        data.append(value)
        except (OSError, ValueError):
            pass  # closed by the test
        finally:
            self.events.put(None)

    def next(self, timeout: float = 30) -> tuple[str, dict] | None:
        event = self.events.get(timeout=timeout)
        if event is not None:
            self.received.append(event)
        return event

    def until_closed(self, timeout: float = 30) -> list[tuple[str, dict]]:
        while self.next(timeout) is not None:
            pass
        return self.received

    def close(self) -> None:
        """Go away like a browser tab being closed."""
        with contextlib.suppress(OSError):  # already closed
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


def token_of(user) -> str:
    """The user's API token (made on first use)."""
    return Token.objects.get_or_create(user=user)[0].key


def open_streams() -> int:
    """Open streams: each holds one of its user's slots, an advisory lock of the process's
    listening connection (the hub's)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return cursor.fetchone()[0]


async def on_worker_pool(action):
    """`await action(job_manager)` on a worker's own connector (its pool, its SQL), as a worker runs it."""
    with app.replace_connector(app.connector.get_worker_connector()) as worker_app:
        async with worker_app.open_async():
            return await action(worker_app.job_manager)


def claim_jobs(limit: int, queues: list[str] | None = None) -> list[int]:
    """One claim of up to `limit` jobs by a newly registered worker; the ids in the order the
    worker starts them."""

    async def claim(manager):
        worker_id = await manager.register_worker()
        return [job.id for job in await manager.fetch_jobs(queues=queues, worker_id=worker_id, limit=limit)]

    return asyncio.run(on_worker_pool(claim))
