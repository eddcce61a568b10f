"""Start-up checks that turn a misconfiguration into one clear line instead of a traceback, and
the worker's event loop."""

from __future__ import annotations

import asyncio
import sys

import psycopg
from django.core.exceptions import ImproperlyConfigured

from config.database_url import describe_hosts

# Commands that need the database from their first second; `check`, `help`, `makemigrations
# --check` and friends stay usable without one.
_DATABASE_COMMANDS = {"runserver", "migrate", "procrastinate", "ensure_dev_admin", "shell"}
_CONNECTION_CHECK_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "target_session_attrs")


def _exit(message: str) -> None:
    print(f"secondbrain: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_settings_or_exit() -> None:
    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018 (forces settings to load)
    except ImproperlyConfigured as exc:
        _exit(str(exc))


def fail_fast_if_database_unreachable(argv: list[str] | None = None) -> None:
    """Exit with one line when the database cannot be reached (called before serving)."""
    load_settings_or_exit()
    if argv is not None and (len(argv) < 2 or argv[1] not in _DATABASE_COMMANDS):
        return
    from django.conf import settings

    db = settings.DATABASES["default"]
    variable = "DATABASE_URL"
    if argv is not None and argv[1] == "procrastinate" and settings.DATABASE_DIRECT is not None:
        # A worker behind a pooler connects to DATABASE_DIRECT_URL only (config/database.py).
        db, variable = {**db, **settings.DATABASE_DIRECT}, "DATABASE_DIRECT_URL"
    try:
        psycopg.connect(
            dbname=db["NAME"],
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
            connect_timeout=db["OPTIONS"].get("connect_timeout", 5),
            # The same TLS as the app's own connections (DATABASE_SSLMODE, DATABASE_SSLROOTCERT), and
            # with several hosts the same choice among them (a standby is no use to a read-write app).
            **{k: v for k, v in db["OPTIONS"].items() if k in _CONNECTION_CHECK_OPTIONS},
        ).close()
    except psycopg.OperationalError as exc:
        where = f"{describe_hosts(db.get('HOST'), db.get('PORT'))}/{db['NAME']}"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        _exit(f"cannot reach the database at {where} ({reason}); check {variable}")


def use_connection_pool() -> None:
    """For the web server only (config/asgi.py), before any connection is made.

    Under ASGI each request runs its sync parts in a thread of its own, and Django keeps a
    connection per thread: with DATABASE_CONN_MAX_AGE every request would open a new connection
    and leave the old one to the garbage collector. A pool per process hands connections from
    thread to thread instead; Django returns the request's connection to it when the request
    ends. Workers and management commands keep their persistent connections."""
    from django.conf import settings

    size = settings.DATABASE_POOL_MAX_SIZE
    if size <= 0:
        return
    db = settings.DATABASES["default"]
    db["CONN_MAX_AGE"] = 0  # required by Django's pool
    # A request waits this long for a free connection, then answers 503 (core/middleware.py).
    # While the database restarts every connection attempt fails at once, but the pool keeps
    # trying until this timeout: kept short, so a request gets its 503 and Retry-After in
    # seconds rather than hanging for the whole connect timeout (make chaos counts that a hang).
    db["OPTIONS"]["pool"] = {"min_size": 1, "max_size": size, "timeout": settings.DATABASE_POOL_TIMEOUT_SECONDS}


def use_worker_event_loop(argv: list[str]) -> None:
    """`manage.py procrastinate ...` (the worker) runs its loop on settings.JOBS_EVENT_LOOP.
    Procrastinate's command starts the loop with `asyncio.run`, which takes the policy's loop;
    the web server picks its own (uvicorn's `loop`), and other commands keep Python's."""
    from django.conf import settings

    if len(argv) >= 2 and argv[1] == "procrastinate" and settings.JOBS_EVENT_LOOP == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
