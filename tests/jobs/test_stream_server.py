"""Job streams (SSE) under the production server command, against the test database.

The server is started exactly as the Dockerfile starts it (bench/harness.py reads its CMD and
GUNICORN_CMD_ARGS), on a free 127.0.0.1 port: open streams must cost neither a server thread nor
a PostgreSQL connection each, and the caps per user (across processes) and per process answer
429 with Retry-After.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.authtoken.models import Token

from bench.harness import free_port, port_open, server_args
from jobs.tasking import queues
from jobs.tasking.defer import job_defer
from jobs.tasking.registry import job_task
from tests.factories import make_user
from tests.helpers import BASE_DIR, database_url, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# A client's patience for one plain request. With the streams served by threads (gunicorn's
# gthread: 2 workers x 4 threads), a request behind 200 streams never gets an answer at all.
ANSWER_TIMEOUT = 15


@job_task(name="tests.stream_server.later", queue=queues.IMPORTS)
def later() -> None:
    """Never runs here: its job is scheduled for next year, so its streams stay open."""


class Server:
    def __init__(self, log_dir: Path, *, env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log = log_dir / f"server-{self.port}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, *server_args(self.port), *extra_args],
                cwd=BASE_DIR,
                env={
                    **os.environ,
                    "DATABASE_URL": database_url(),
                    "DEBUG": "false",
                    "SECRET_KEY": "stream-server-test-" + "x" * 40,
                    "ALLOWED_HOSTS": "127.0.0.1",
                    "THROTTLE_USER_RATE": "off",
                    "THROTTLE_ANON_RATE": "off",
                    "LOG_LEVEL": "WARNING",
                    **(env or {}),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: port_open(self.port) or self.process.poll() is not None, timeout=60, what="the server")
        assert self.process.poll() is None, self.log.read_text()
        # Every worker process up: one answer is not enough, but the master binds before forking.
        wait_for(lambda: self._health_answers(), timeout=60, what="the server to answer")

    def _health_answers(self) -> bool:
        with contextlib.suppress(OSError):
            return self.request("GET", "/api/health/", timeout=2)[0] in (200, 503)
        return False

    def request(
        self, method: str, path: str, *, token: str | None = None, body: dict | None = None, timeout: float = 5
    ) -> tuple[int, dict]:
        client = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Token {token}"
        try:
            client.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            response = client.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            client.close()

    def threads(self) -> int:
        return sum(psutil.Process(pid).num_threads() for pid in self.worker_pids())

    def worker_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Stream:
    """One SSE request on its own socket; the test holds it open like a browser tab."""

    def __init__(self, server: Server, job_id: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_TIMEOUT)
        self.sock.sendall(
            f"GET /api/jobs/{job_id}/stream/ HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        self.data = b""
        self.status: int | None = None

    def _until(self, marker: bytes) -> None:
        while marker not in self.data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the stream closed before {marker!r}: {self.data!r}")
            self.data += chunk

    def started(self) -> int:
        """The HTTP status; for a 200, once the first event (the job's status) has arrived."""
        self._until(b"\r\n\r\n")
        self.status = int(self.data.split(b" ", 2)[1])
        if self.status == 200:
            self._until(b"event: status")
        return self.status

    def header(self, name: str) -> str | None:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode()
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def error(self) -> dict:
        """The data of the one `event: error` an error answer is (it accepts only event streams)."""
        while True:  # short, and then the server closes
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.data += chunk
        body = self.data.split(b"\r\n\r\n", 1)[1].decode()
        assert body.startswith("event: error\ndata: "), body
        return json.loads(body.removeprefix("event: error\ndata: "))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def servers(tmp_path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def _token(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def _job_for_next_year(owner) -> int:
    return job_defer(later, owner_id=owner.id, schedule_at=timezone.now() + timedelta(days=365))


def _database_connections() -> int:
    """Server sessions on the test database, ours excluded."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def _open(server: Server, job_id: int, token: str, count: int) -> list[Stream]:
    streams = [Stream(server, job_id, token) for _ in range(count)]
    return streams


def _the_api_answers(server: Server, token: str) -> None:
    status, body = server.request("GET", "/api/health/", timeout=ANSWER_TIMEOUT)
    # 503 "unhealthy" here only because no job worker runs: the answer itself is what matters.
    assert status in (200, 503) and body["database"] == "up", body
    status, body = server.request(
        "POST", "/api/notes/", token=token, body={"content": "still answering #sse"}, timeout=ANSWER_TIMEOUT
    )
    assert status == 201, body


def test_with_200_open_streams_the_api_answers_and_database_connections_do_not_grow(servers, tmp_path):
    owner = make_user("streamer")
    token = _token(owner)
    job_id = _job_for_next_year(owner)
    server = Server(tmp_path, env={"JOBS_STREAM_MAX_PER_USER": "0"})
    servers.append(server)
    streams: list[Stream] = []
    try:
        streams += _open(server, job_id, token, 10)
        _the_api_answers(server, token)
        assert [stream.started() for stream in streams] == [200] * 10
        assert b'data: {"status": "scheduled"}' in streams[0].data
        _the_api_answers(server, token)  # the pool has what plain requests need
        with_10 = _database_connections()
        threads_with_10 = server.threads()

        streams += _open(server, job_id, token, 190)
        _the_api_answers(server, token)  # while the 190 new streams are being opened
        assert [stream.started() for stream in streams] == [200] * 200
        _the_api_answers(server, token)
        with_200 = _database_connections()
        threads_with_200 = server.threads()
    finally:
        for stream in streams:
            stream.close()
    # One listening connection per process whatever the number of streams, plus the pools' few.
    assert with_200 - with_10 <= 2, (with_10, with_200)
    # Nor a thread each (the request threads of plain requests come and go).
    assert threads_with_200 - threads_with_10 <= 8, (threads_with_10, threads_with_200)


def test_the_per_user_cap_holds_across_processes_and_a_killed_process_frees_its_slots(servers, tmp_path):
    owner, other = make_user("capped"), make_user("someone-else")
    token, other_token = _token(owner), _token(other)
    job_id = _job_for_next_year(owner)
    other_job = _job_for_next_year(other)
    env = {"JOBS_STREAM_MAX_PER_USER": "2"}
    a = Server(tmp_path, env=env, extra_args=("--workers", "1"))
    b = Server(tmp_path, env=env, extra_args=("--workers", "1"))
    servers += [a, b]
    held: list[Stream] = []
    try:
        held += [Stream(a, job_id, token), Stream(b, job_id, token)]
        assert [stream.started() for stream in held] == [200, 200]

        for server in (a, b):
            refused = Stream(server, job_id, token)
            assert refused.started() == 429
            assert int(refused.header("Retry-After")) > 0
            assert "limit" in refused.error()["detail"]
            refused.close()
        # The cap is per user.
        theirs = Stream(a, other_job, other_token)
        assert theirs.started() == 200
        theirs.close()

        # A stream that ends gives its slot back, to any process.
        held.pop(1).close()  # the one on b
        held.append(_opened_once_free(a, job_id, token))

        # A process that dies (no clean-up at all) gives its slots back too: PostgreSQL
        # releases the locks of its listening connection.
        for pid in a.worker_pids():
            os.kill(pid, signal.SIGKILL)
        held.append(_opened_once_free(b, job_id, token))
        held.append(_opened_once_free(b, job_id, token))
        refused = Stream(b, job_id, token)
        assert refused.started() == 429
        refused.close()
    finally:
        for stream in held:
            stream.close()


def _opened_once_free(server: Server, job_id: int, token: str) -> Stream:
    def attempt() -> Stream | None:
        stream = Stream(server, job_id, token)
        if stream.started() == 200:
            return stream
        stream.close()
        return None

    return wait_for(attempt, timeout=30, interval=0.3, what="a stream slot to be free")


def test_the_per_process_cap_answers_429_with_retry_after(servers, tmp_path):
    users = [make_user(f"viewer-{n}") for n in range(4)]
    jobs = [_job_for_next_year(user) for user in users]
    server = Server(tmp_path, env={"JOBS_STREAM_MAX_PER_PROCESS": "3"}, extra_args=("--workers", "1"))
    servers.append(server)
    held = [Stream(server, job, _token(user)) for user, job in zip(users[:3], jobs[:3], strict=True)]
    try:
        assert [stream.started() for stream in held] == [200] * 3
        refused = Stream(server, jobs[3], _token(users[3]))
        assert refused.started() == 429
        assert int(refused.header("Retry-After")) > 0
        assert "limit" in refused.error()["detail"]
        refused.close()
        _the_api_answers(server, _token(users[3]))  # only streams are capped

        held.pop(0).close()
        held.append(_opened_once_free(server, jobs[3], _token(users[3])))
    finally:
        for stream in held:
            stream.close()
