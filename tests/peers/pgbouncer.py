"""A real PgBouncer (Debian's `pgbouncer` package) in transaction mode on 127.0.0.1.

It listens on a free port and pools one database, the test database, towards the PostgreSQL the
tests run on. Started as a process of its own from a pgbouncer.ini in a temporary directory;
as root it runs as the `postgres` user (PgBouncer refuses to run as root).
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg

PGBOUNCER = "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgBouncer:
    def __init__(self, directory: Path, *, host: str, port: int, dbname: str, user: str) -> None:
        self.port = _free_port()
        self.dbname = dbname
        self.user = user
        self.directory = directory
        self.log = directory / "pgbouncer.log"
        (directory / "users.txt").write_text(f'"{user}" ""\n')
        self.ini = directory / "pgbouncer.ini"
        self.ini.write_text(
            "[databases]\n"
            f"{dbname} = host={host} port={port} dbname={dbname}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"  # TCP only
            "auth_type = trust\n"
            f"admin_users = {user}\n"
            f"auth_file = {directory / 'users.txt'}\n"
            "pool_mode = transaction\n"
            "default_pool_size = 10\n"
            "max_client_conn = 200\n"
            # Transaction pooling's rule: a server connection is handed back at every commit.
            "server_reset_query =\n"
        )
        self.process: subprocess.Popen | None = None

    def url(self) -> str:
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    def clients(self) -> list[dict]:
        """PgBouncer's SHOW CLIENTS, but for the admin console's own connection."""
        return [row for row in self._show("CLIENTS") if row["database"] != "pgbouncer"]

    def server_ports(self) -> set[int]:
        """The local ports of PgBouncer's connections to PostgreSQL (pg_stat_activity's client_port)."""
        return {row["local_port"] for row in self._show("SERVERS")}

    def _show(self, what: str) -> list[dict]:
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname="pgbouncer",
            user=self.user,
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,  # the admin console speaks the simple query protocol only
        ) as conn:
            cursor = conn.execute(f"SHOW {what}")
            columns = [c.name for c in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def start(self) -> None:
        args = [PGBOUNCER, str(self.ini)]
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            for path in self.directory.iterdir():  # read again after it drops root (SIGHUP)
                os.chown(path, account.pw_uid, account.pw_gid)
            args[1:1] = ["-u", "postgres"]
        # Not daemonized, no logfile: its log goes to this file (opened here, before it drops root).
        self._log_file = open(self.log, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self._log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen on {self.port}: {self._log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # immediate shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._log_file.close()

    def _log_tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else ""


def pgbouncer_available() -> bool:
    return Path(PGBOUNCER).exists()
