"""Production settings: `check --deploy` is clean with the documented variables, TLS to the
database is configurable, and gunicorn serves the static files itself (WhiteNoise)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from django.db import connection

from bench.harness import server_args
from tests.helpers import BASE_DIR, database_url

SECRET = "a-production-secret-of-more-than-fifty-characters-0123456789"
PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": SECRET,
    "ALLOWED_HOSTS": "secondbrain.example.com",
    "SECURE_SSL_REDIRECT": "true",
    "SESSION_COOKIE_SECURE": "true",
    "CSRF_COOKIE_SECURE": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "SECURE_HSTS_PRELOAD": "true",
    "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto,https",
    "CSRF_TRUSTED_ORIGINS": "https://secondbrain.example.com",
}
# What a deployment might have left in the environment that would change the outcome.
_CLEARED = {*PRODUCTION, "DATABASE_SSLMODE", "DATABASE_SSLROOTCERT", "STATIC_ROOT"}


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    return subprocess.run(
        [sys.executable, *args], cwd=BASE_DIR, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


def test_check_deploy_is_clean_with_the_production_variables():
    result = _run("manage.py", "check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_without_them():
    bare = {"DEBUG": "false", "SECRET_KEY": SECRET, "ALLOWED_HOSTS": "secondbrain.example.com"}
    result = _run("manage.py", "check", "--deploy", "--fail-level", "WARNING", **bare)
    assert result.returncode == 1
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr, warning


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SECURE_PROXY_SSL_HEADER", "X-Forwarded-Proto"),
        ("DATABASE_SSLMODE", "sometimes"),
        ("DATABASE_SSLROOTCERT", "/nonexistent/root.crt"),
        ("SECURE_HSTS_SECONDS", "a year"),
    ],
)
def test_a_bad_value_stops_the_start_naming_the_variable(variable, value):
    result = _run("manage.py", "check", DEBUG="true", **{variable: value})
    assert result.returncode != 0
    assert variable in result.stderr


def test_the_proxy_header_setting_takes_django_form():
    script = "import django; django.setup(); from django.conf import settings; print(settings.SECURE_PROXY_SSL_HEADER)"
    result = _run("-c", script, DJANGO_SETTINGS_MODULE="config.settings", **PRODUCTION)
    assert result.stdout.strip() == "('HTTP_X_FORWARDED_PROTO', 'https')", result.stderr


# --- TLS to the database ---------------------------------------------------------------------
_CONNECT = """
import json, django
django.setup()
from django.db import connection
from procrastinate.contrib.django import utils
out = {"worker_sslmode": utils.connector_params("default").get("sslmode"),
       "django_sslmode": connection.get_connection_params().get("sslmode")}
try:
    with connection.cursor() as cursor:
        cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        out["ssl"] = cursor.fetchone()[0]
except Exception as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""


def _server_has_ssl() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SHOW ssl")
        return cursor.fetchone()[0] == "on"


@pytest.mark.django_db
def test_database_sslmode_reaches_the_web_and_worker_connections():
    env = {"DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": database_url(), "DEBUG": "true"}
    required = json.loads(_run("-c", _CONNECT, DATABASE_SSLMODE="require", **env).stdout)
    assert required["django_sslmode"] == required["worker_sslmode"] == "require"
    if _server_has_ssl():
        assert required["ssl"] is True
    else:  # libpq refused to go on without TLS: the setting is what it connected with
        assert "SSL" in required["error"] and "ssl" not in required

    disabled = json.loads(_run("-c", _CONNECT, DATABASE_SSLMODE="disable", **env).stdout)
    assert disabled["ssl"] is False and disabled["worker_sslmode"] == "disable"


@pytest.mark.django_db
def test_the_start_up_check_connects_with_the_same_tls():
    if _server_has_ssl():
        pytest.skip("this server speaks TLS; the refusal below needs one that does not")
    result = _run(
        "manage.py", "migrate", "--check", DEBUG="true", DATABASE_URL=database_url(), DATABASE_SSLMODE="require"
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "SSL" in result.stderr


# --- static files: WhiteNoise --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, **headers: str):
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.headers, response.read()  # headers: any case


@pytest.mark.django_db
def test_gunicorn_serves_collected_static_files_compressed(tmp_path):
    """As in the Docker image: collectstatic at build, then its server command alone serves /static/."""
    static_root = tmp_path / "static"
    env = {"DEBUG": "false", "SECRET_KEY": SECRET, "STATIC_ROOT": str(static_root), "DATABASE_URL": database_url()}
    collected = _run("manage.py", "collectstatic", "--no-input", "--verbosity", "0", timeout=180, **env)
    assert collected.returncode == 0, collected.stderr
    assert (static_root / "admin" / "css" / "base.css.gz").is_file()

    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    server = subprocess.Popen(
        [sys.executable, *server_args(port), "--workers", "1"],  # the Dockerfile's command
        cwd=BASE_DIR,
        env={**base, **env, "ALLOWED_HOSTS": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60  # the Dockerfile command preloads the app: slower on a busy machine
        while True:
            try:
                status, headers, body = _get(f"http://127.0.0.1:{port}/static/admin/css/base.css")
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"gunicorn did not serve: {server.stderr.read() if server.poll() else ''}"
                    ) from exc
                time.sleep(0.2)
        assert status == 200 and headers["Content-Type"].startswith("text/css")
        status, headers, body = _get(
            f"http://127.0.0.1:{port}/static/admin/css/base.css", **{"Accept-Encoding": "gzip"}
        )
        assert status == 200 and headers.get("Content-Encoding") == "gzip"
        status, headers, body = _get(f"http://127.0.0.1:{port}/static/jobs/dashboard.js")
        assert status == 200 and b"dashboard" in body.lower()
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_without_collectstatic_the_apps_files_are_served(client):
    """Development and tests (no collected files): WhiteNoise finds them in the apps."""
    response = client.get("/static/jobs/dashboard.js")
    assert response.status_code == 200
    assert b"".join(response.streaming_content)
