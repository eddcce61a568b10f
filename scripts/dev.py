"""The launcher behind `make run` and `make test`.

    python scripts/dev.py run            migrate, dev admin, web on :8000 + one worker
    python scripts/dev.py test [ARGS]    the test suite (ARGS go to pytest)
    python scripts/dev.py db             start the embedded PostgreSQL, print its DATABASE_URL
    python scripts/dev.py stopdb         stop it

When DATABASE_URL is unset, the embedded PostgreSQL (data under .data/pg) is started first
and stopped at the end if this command started it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import devdb

BASE_DIR = devdb.BASE_DIR
PYTHON = sys.executable


def _ensure_database(database_url: str) -> None:
    """CREATE DATABASE when the URL's database does not exist yet (first run)."""
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    name = info.get("dbname")
    if not name or name == "postgres":
        return
    try:
        psycopg.connect(database_url, connect_timeout=5).close()
        return
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise SystemExit(f"secondbrain: cannot reach the database ({str(exc).strip()})") from exc
    with psycopg.connect(**{**info, "dbname": "postgres"}, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def _database() -> tuple[str, bool]:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], False
    print("secondbrain: starting the embedded PostgreSQL (data in .data/pg)", flush=True)
    url, started = devdb.start()
    print(f"secondbrain: DATABASE_URL={url}", flush=True)
    return url, started


def _manage(*args: str, env: dict) -> None:
    subprocess.run([PYTHON, "manage.py", *args], check=True, cwd=BASE_DIR, env=env)


_APP_DIRS = ("config", "core", "jobs", "llm", "notes", "notifications", "digests", "observability")


def run() -> int:
    url, started = _database()
    env = {**os.environ, "DATABASE_URL": url, "PYTHONUNBUFFERED": "1"}
    env.setdefault("DEBUG", "true")
    env.setdefault("EMAIL_URL", "filemail://")  # mail lands as files in .data/mail
    port = env.get("PORT", "8000")
    children: list[subprocess.Popen] = []
    try:
        _ensure_database(url)
        _manage("migrate", "--no-input", env=env)
        if env["DEBUG"].lower() in ("1", "true", "yes", "on"):
            _manage("ensure_dev_admin", env=env)
        children = [
            # ASGI, as in production (runserver's WSGI would hold every job stream back until it ends).
            subprocess.Popen(
                [PYTHON, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", port, "--reload"]
                + [arg for app in _APP_DIRS for arg in ("--reload-dir", app)],
                cwd=BASE_DIR,
                env=env,
            ),
            subprocess.Popen([PYTHON, "manage.py", "procrastinate", "worker"], cwd=BASE_DIR, env=env),
        ]
        print(
            f"\nsecondbrain is running:\n  notes    http://127.0.0.1:{port}/api/notes/\n"
            f"  admin    http://127.0.0.1:{port}/admin/\n  health   http://127.0.0.1:{port}/api/health/\n"
            f"  API docs http://127.0.0.1:{port}/api/docs/\nCtrl-C stops everything.\n",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return max(child.returncode or 0 for child in children if child.poll() is not None)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(children)
        if started:
            print("secondbrain: stopping the embedded PostgreSQL", flush=True)
            devdb.stop()


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # both stop gracefully on SIGTERM
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def test(pytest_args: list[str]) -> int:
    url, started = _database()
    env = {**os.environ, "DATABASE_URL": url}
    # The suite runs with production-like settings: DEBUG off and a throw-away secret.
    env.setdefault("DEBUG", "false")
    env.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    # Required with DEBUG off; Django's test runner swaps in its in-memory backend anyway, and
    # tests that send for real point their workers at a local SMTP sink.
    env.setdefault("EMAIL_URL", "consolemail://")
    # Worker threads must not keep connections open, or the test database cannot be dropped.
    env.setdefault("DATABASE_CONN_MAX_AGE", "0")
    try:
        return subprocess.run([PYTHON, "-m", "pytest", *pytest_args], cwd=BASE_DIR, env=env).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        if started:
            devdb.stop()


def main(argv: list[str]) -> int:
    # Ctrl-C must stop us even when started from a shell that ignores SIGINT in the background.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    command = argv[0] if argv else "run"
    if command == "run":
        return run()
    if command == "test":
        return test(argv[1:])
    if command == "db":
        url, _ = devdb.start()
        print(url)
        return 0
    if command == "stopdb":
        devdb.stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
