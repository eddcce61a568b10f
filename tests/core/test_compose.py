"""docker-compose.yml and the Dockerfile keep their production rules (docs/operating.md,
"Deploying with compose"): an edit that drops one fails here. Nothing is built or started;
the health-check scripts they name are run for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from django.conf import settings

from tests.helpers import BASE_DIR

COMPOSE = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())  # merge keys (<<) resolved
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "web", "worker")
DOCKERFILE = (BASE_DIR / "Dockerfile").read_text()
# Values that must come from the operator's environment, never from a default in the file.
REQUIRED = ("POSTGRES_PASSWORD", "SECRET_KEY", "EMAIL_URL", "METRICS_TOKEN")


def _seconds(duration: str) -> float:
    """A compose duration: 1m30s, 45s, 1.5s."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service]["environment"].items()}


def _required(variable: str) -> str:
    return "${" + variable + ":?"


# --- the environment --------------------------------------------------------------------------


@pytest.mark.parametrize("service", APP_SERVICES)
def test_the_app_services_take_their_secrets_and_mail_server_from_the_environment(service):
    env = _env(service)
    assert env["SECRET_KEY"].startswith(_required("SECRET_KEY"))
    assert env["EMAIL_URL"].startswith(_required("EMAIL_URL"))
    assert env["METRICS_TOKEN"].startswith(_required("METRICS_TOKEN"))
    assert _required("POSTGRES_PASSWORD") in env["DATABASE_URL"]
    assert env.get("DEBUG", "false").lower() in ("0", "false", "no", "off")  # so EMAIL_URL is checked
    assert "METRICS_PUBLIC" not in env or env["METRICS_PUBLIC"].lower() == "false"


def test_the_database_password_has_no_default():
    assert _env("postgres")["POSTGRES_PASSWORD"].startswith(_required("POSTGRES_PASSWORD"))
    text = (BASE_DIR / "docker-compose.yml").read_text()
    for variable in REQUIRED:
        for default in re.findall(r"\$\{" + variable + r"(:?-[^}]*)\}", text):
            pytest.fail(f"{variable} has a default ({default}) in docker-compose.yml")
    for service in APP_SERVICES:
        url = _env(service)["DATABASE_URL"]
        password = re.match(r"postgres://[^:@/]+:([^@]*)@", url)
        assert password and password.group(1).startswith("${POSTGRES_PASSWORD:?"), url


# The optional variables the compose file passes through, and what their defaults must mean.
OPTIONAL = {"DATABASE_DIRECT_URL": "", "OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_SERVICE_NAME": "secondbrain"}
_SETTINGS_PROBE = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps([s.DATABASE_BEHIND_POOLER, s.TRACING_ENABLED, s.TRACING_SERVICE_NAME]))"
)


def _compose_default(value: str) -> str:
    """What docker compose puts in for ${VAR:-default} when VAR is unset."""
    match = re.fullmatch(r"\$\{[A-Z_]+:-([^}]*)\}", value)
    assert match, f"{value} is not a ${{VAR:-default}} pass-through"
    return match.group(1)


def _settings_with(**env: str) -> list:
    base = {k: v for k, v in os.environ.items() if k not in OPTIONAL and k != "TRACING_ENABLED"}
    done = subprocess.run(
        [sys.executable, "-c", _SETTINGS_PROBE],
        cwd=BASE_DIR,
        env={**base, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_the_pooler_and_tracing_variables_pass_through_with_defaults_that_turn_them_off(service):
    env = _env(service)
    for variable, default in OPTIONAL.items():
        assert env[variable].startswith("${" + variable + ":-"), env[variable]
        assert _compose_default(env[variable]) == default, variable


def test_the_compose_defaults_mean_no_pooler_and_no_tracing_and_set_values_turn_them_on():
    defaults = {variable: _compose_default(_env("web")[variable]) for variable in OPTIONAL}
    assert _settings_with(**defaults) == [False, False, "secondbrain"]
    pooled = {  # read, never connected to
        "DATABASE_URL": "postgres://postgres@127.0.0.1:6432/secondbrain",
        "DATABASE_DIRECT_URL": "postgres://postgres@127.0.0.1:5432/secondbrain",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_SERVICE_NAME": "secondbrain-web",
    }
    assert _settings_with(**pooled) == [True, True, "secondbrain-web"]


# --- health checks ----------------------------------------------------------------------------


def test_web_and_workers_have_health_checks_and_workers_check_their_heartbeat():
    assert SERVICES["web"]["healthcheck"]["test"] == ["CMD", "python", "scripts/web_health.py"]
    assert SERVICES["worker"]["healthcheck"]["test"] == ["CMD", "python", "manage.py", "jobs_worker_health"]
    assert (BASE_DIR / "scripts" / "web_health.py").is_file()
    assert (BASE_DIR / "jobs" / "management" / "commands" / "jobs_worker_health.py").is_file()
    # The check reads the id the worker writes: both in the worker's container.
    assert _env("worker")["WORKER_ID_FILE"].startswith("/tmp/")
    for service in ("web", "worker"):
        check = SERVICES[service]["healthcheck"]
        assert _seconds(check["timeout"]) <= _seconds(check["interval"])
        assert "start_period" in check  # no failures counted while the process starts


def test_the_web_health_check_is_not_shipped_out_of_the_image():
    ignored = (BASE_DIR / ".dockerignore").read_text().split()
    assert "scripts" not in ignored and "scripts/web_health.py" not in ignored


class _FakeHealth(BaseHTTPRequestHandler):
    answer: tuple[int, dict] = (200, {})
    seen: list[dict] = []

    def do_GET(self) -> None:
        _FakeHealth.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        status, body = _FakeHealth.answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_web():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeHealth.seen = []
    yield server
    server.shutdown()
    server.server_close()


def _web_health(port: int, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("ALLOWED_HOSTS", "SECURE_PROXY_SSL_HEADER")}
    return subprocess.run(
        [sys.executable, "scripts/web_health.py", str(port)],
        cwd=BASE_DIR,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("status", "body", "healthy"),
    [
        (200, {"status": "healthy", "database": "up"}, True),
        (503, {"status": "unhealthy", "reasons": ["no live worker"], "database": "up"}, True),
        (503, {"status": "unhealthy", "reasons": ["database unreachable"], "database": "down"}, False),
        (500, {}, False),
        (301, {}, False),
    ],
)
def test_the_web_health_check_asks_api_health_and_reads_its_answer(fake_web, status, body, healthy):
    _FakeHealth.answer = (status, body)
    result = _web_health(fake_web.server_address[1], ALLOWED_HOSTS="secondbrain.example.com,localhost")
    assert result.returncode == (0 if healthy else 1), result.stdout
    assert result.stdout.count("\n") == 1
    (request,) = _FakeHealth.seen
    assert request["path"] == "/api/health/"
    assert request["host"] == "secondbrain.example.com"  # one that ALLOWED_HOSTS lets through


def test_the_web_health_check_comes_in_as_https_behind_a_tls_proxy(fake_web):
    _FakeHealth.answer = (200, {"status": "healthy", "database": "up"})
    result = _web_health(fake_web.server_address[1], SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto,https")
    assert result.returncode == 0, result.stdout
    assert _FakeHealth.seen[0]["x-forwarded-proto"] == "https"  # else SECURE_SSL_REDIRECT redirects it
    assert _FakeHealth.seen[0]["host"] == "localhost"


def test_the_web_health_check_fails_when_nothing_answers(fake_web):
    port = fake_web.server_address[1]
    fake_web.shutdown()
    fake_web.server_close()
    result = _web_health(port)
    assert result.returncode == 1
    assert "no answer" in result.stdout


# --- stopping and scaling ---------------------------------------------------------------------


def test_the_workers_stop_grace_period_outlasts_their_shutdown_wait():
    grace = float(_env("worker").get("WORKER_SHUTDOWN_GRACE_SECONDS", settings.WORKER_SHUTDOWN_GRACE_SECONDS))
    # After the grace period: the aborts (~0.2 s) and the last write of finished jobs.
    assert _seconds(SERVICES["worker"]["stop_grace_period"]) >= grace + 10


def test_the_web_stop_grace_period_outlasts_gunicorns_graceful_timeout():
    graceful = re.search(r"--graceful-timeout (\d+)", DOCKERFILE)
    assert graceful, "GUNICORN_CMD_ARGS in the Dockerfile sets --graceful-timeout"
    assert _seconds(SERVICES["web"]["stop_grace_period"]) > float(graceful.group(1))


def test_workers_are_scaled_by_a_number():
    replicas = SERVICES["worker"]["deploy"]["replicas"]
    match = re.fullmatch(r"\$\{WORKERS:-(\d+)\}", str(replicas))
    assert match and int(match.group(1)) >= 2, replicas
    # A scaled service cannot have one name or publish one host port.
    assert "container_name" not in SERVICES["worker"] and "ports" not in SERVICES["worker"]


# --- the Dockerfile ---------------------------------------------------------------------------


def test_the_dockerfile_takes_its_base_image_as_a_build_argument():
    lines = [line.strip() for line in DOCKERFILE.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim-bookworm"
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE}"]


def test_the_dockerfile_build_step_sets_what_settings_require_with_debug_off():
    """collectstatic runs with DEBUG off at build time: each required variable needs a value."""
    step = re.search(r"^RUN ((?:.*\\\n)*.*collectstatic.*)$", DOCKERFILE, re.MULTILINE)
    assert step, "the Dockerfile collects static files"
    for variable in ("DATABASE_URL", "SECRET_KEY", "EMAIL_URL"):
        assert re.search(rf"(^|\s){variable}=\S", step.group(1)), variable
