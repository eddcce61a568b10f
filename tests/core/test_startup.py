"""Misconfiguration stops the service at start-up with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import BASE_DIR


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DEBUG", "EMAIL_URL")}
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


def test_refuses_to_start_without_email_url_when_debug_is_off():
    """Not the console backend: it would print every recipient and body to a production log."""
    secret = "a-production-secret-of-more-than-fifty-characters-0123456789"
    for missing in ({}, {"EMAIL_URL": ""}):
        result = _run("manage.py", "check", DEBUG="false", SECRET_KEY=secret, **missing)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "EMAIL_URL must be set when DEBUG is off" in result.stderr
    result = _run("manage.py", "check", DEBUG="false", SECRET_KEY=secret, EMAIL_URL="smtp://127.0.0.1:2525")
    assert result.returncode == 0, result.stderr


def test_debug_mode_prints_mail_to_the_console_without_email_url():
    code = "import django; django.setup(); from django.conf import settings; print(settings.EMAIL_BACKEND)"
    result = _run("-c", code, DEBUG="true", DJANGO_SETTINGS_MODULE="config.settings")
    assert result.stdout.strip() == "django.core.mail.backends.console.EmailBackend", result.stderr


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


def test_a_bad_weekly_digest_schedule_stops_the_start_naming_its_variable():
    for variable, value in (("DIGEST_WEEKLY_CRON", "0 2 * *"), ("DIGEST_WEEKLY_TIMEZONE", "Europe/Pariss")):
        result = _run("manage.py", "check", DEBUG="true", **{variable: value})
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert variable in result.stderr and repr(value) in result.stderr


def test_the_weekly_digest_runs_on_the_configured_time_zone():
    code = (
        "import django; django.setup();"
        "from procrastinate.contrib.django import app;"
        "from jobs.engine.periodic import schedule_of;"
        "pt = app.periodic_registry.periodic_tasks[('digests.weekly_fanout', 'weekly-digest')];"
        "s = schedule_of(pt); print(s.cron, s.timezone, s.next_after(1790000000))"
    )
    result = _run(
        "-c",
        code,
        DEBUG="true",
        DJANGO_SETTINGS_MODULE="config.settings",
        DIGEST_WEEKLY_CRON="0 2 * * FRI",
        DIGEST_WEEKLY_TIMEZONE="Europe/Paris",
    )
    assert result.returncode == 0, result.stderr
    # 1790000000 is Monday 2026-09-21: the next Friday 02:00 in Paris (summer time) is 00:00 UTC.
    assert result.stdout.split() == ["0", "2", "*", "*", "FRI", "Europe/Paris", "1790294400"]


def test_refuses_an_event_loop_it_does_not_know():
    result = _run("manage.py", "check", DEBUG="true", JOBS_EVENT_LOOP="trio")
    assert result.returncode == 2, result.stderr
    assert "JOBS_EVENT_LOOP" in result.stderr
