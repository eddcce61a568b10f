"""Start-up checks that turn a misconfiguration into one clear line instead of a traceback."""

from __future__ import annotations

import sys

import psycopg
from django.core.exceptions import ImproperlyConfigured

# Commands that need the database from their first second; `check`, `help`, `makemigrations
# --check` and friends stay usable without one.
_DATABASE_COMMANDS = {"runserver", "migrate", "procrastinate", "ensure_dev_admin", "shell"}


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
    try:
        psycopg.connect(
            dbname=db["NAME"],
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
            connect_timeout=db["OPTIONS"].get("connect_timeout", 5),
            # The same TLS as the app's own connections (DATABASE_SSLMODE, DATABASE_SSLROOTCERT).
            **{k: v for k, v in db["OPTIONS"].items() if k in ("sslmode", "sslrootcert", "sslcert", "sslkey")},
        ).close()
    except psycopg.OperationalError as exc:
        where = f"{db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}/{db['NAME']}"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        _exit(f"cannot reach the database at {where} ({reason}); check DATABASE_URL")
