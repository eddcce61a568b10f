"""The web server under test, started as the Dockerfile starts it (bench/harness.py reads its CMD
and GUNICORN_CMD_ARGS) on a free 127.0.0.1 port against the test database, and SSE streams held
open on it like browser tabs (tests/jobs/test_stream_server.py, tests/core/test_pooler.py)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from bench.harness import free_port, port_open, server_args
from tests.helpers import BASE_DIR, database_url, wait_for

# A client's patience for one plain request. With the streams served by threads (gunicorn's
# gthread: 2 workers x 4 threads), a request behind 200 streams never gets an answer at all.
ANSWER_TIMEOUT = 15


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
