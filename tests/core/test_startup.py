"""Misconfiguration stops the service at start-up with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import BASE_DIR


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG")}
    return subprocess.run(
        [sys.executable, *args], cwd=BASE_DIR, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_refuses_to_start_without_a_real_secret_key_when_debug_is_off():
    for secret in ({}, {"SECRET_KEY": "short"}, {"SECRET_KEY": "django-insecure-" + "x" * 40}):
        result = _run("manage.py", "migrate", DEBUG="false", **secret)
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0
        assert "SECRET_KEY" in result.stderr


def test_debug_mode_runs_without_a_secret_key():
    result = _run("manage.py", "check", DEBUG="true")
    assert result.returncode == 0, result.stderr


def test_fails_fast_with_one_line_when_the_database_is_unreachable():
    unreachable = "postgres://postgres@127.0.0.1:1/secondbrain"
    for command in (["manage.py", "migrate"], ["manage.py", "procrastinate", "worker"], ["-c", "import config.wsgi"]):
        result = _run(*command, DEBUG="true", DATABASE_URL=unreachable, DATABASE_CONNECT_TIMEOUT="2")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "cannot reach the database at 127.0.0.1:1/secondbrain" in result.stderr


def test_database_url_must_be_postgres():
    result = _run("manage.py", "check", DEBUG="true", DATABASE_URL="sqlite:///db.sqlite3")
    assert result.returncode == 2
    assert "PostgreSQL" in result.stderr
