"""Fixtures only: the helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import uvicorn
from django.core.asgi import get_asgi_application
from django.db import connection
from rest_framework.test import APIClient

from bench.harness import free_port
from tests.factories import make_user
from tests.helpers import PROCRASTINATE_TABLES, client_for, wait_for
from tests.peers.claude import FakeClaude
from tests.peers.pgbouncer import PgBouncer, pgbouncer_available
from tests.peers.smtp import SmtpSink


@pytest.fixture(autouse=True)
def _clean_job_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    """Procrastinate's tables are not Django-managed, so a flush leaves them: empty them."""
    yield
    marker = request.node.get_closest_marker("django_db")
    transactional = marker is not None and marker.kwargs.get("transaction", False)
    if transactional or "transactional_db" in request.fixturenames:
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE")


@pytest.fixture(autouse=True)
def _no_throttling(settings) -> None:
    """API throttles are off in tests (one address, many requests); tests/core/test_throttling.py
    turns them on with small rates."""
    settings.THROTTLE_USER_RATE = None
    settings.THROTTLE_ANON_RATE = None


@pytest.fixture
def user(db):
    return make_user("alice")


@pytest.fixture
def other_user(db):
    return make_user("bob")


@pytest.fixture
def api(user) -> APIClient:
    return client_for(user)


@pytest.fixture
def claude(settings) -> Iterator[FakeClaude]:
    """A Messages API peer on 127.0.0.1, with the settings pointing the SDK at it."""
    fake = FakeClaude().start()
    settings.ANTHROPIC_API_KEY = "sk-ant-test-key"
    settings.ANTHROPIC_BASE_URL = fake.base_url
    settings.ANTHROPIC_MODEL = "claude-haiku-4-5"
    settings.ANTHROPIC_TIMEOUT_SECONDS = 5.0
    yield fake
    fake.stop()


@pytest.fixture
def smtp(settings) -> Iterator[SmtpSink]:
    """An SMTP server on 127.0.0.1, with Django's e-mail settings pointing at it."""
    sink = SmtpSink().start()
    settings.EMAIL_BACKEND = "notifications.mail.ExactlyOnceSMTPBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = sink.port
    settings.EMAIL_TIMEOUT = 5
    settings.NOTIFICATIONS_RATE_PER_SECOND = 1000
    yield sink
    sink.stop()


@pytest.fixture
def asgi_server(transactional_db, monkeypatch, settings):
    """The project's ASGI application under uvicorn in a thread, so `settings` apply to it.

    Not pytest-django's live_server: a WSGI server buffers an async stream whole."""
    from jobs.console.stream import serve_streams_without_request_thread  # needs the app registry

    # Each request runs in a thread of its own: close its connection at the end (the production
    # server uses a pool instead, config/startup.py).
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "127.0.0.1"]
    port = free_port()
    config = uvicorn.Config(
        serve_streams_without_request_thread(get_asgi_application()),
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, what="uvicorn")
    yield type("LiveServer", (), {"url": f"http://127.0.0.1:{port}"})
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def pgbouncer(transactional_db, tmp_path_factory) -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction mode on 127.0.0.1 in front of this test database
    (Debian's `pgbouncer` package; the test skips without it)."""
    if not pgbouncer_available():
        pytest.skip("pgbouncer is missing: apt-get install pgbouncer")
    db = connection.settings_dict
    bouncer = PgBouncer(
        tmp_path_factory.mktemp("pgbouncer"),
        host=db["HOST"] or "127.0.0.1",
        port=int(db["PORT"] or 5432),
        dbname=db["NAME"],
        user=db["USER"],
    )
    bouncer.start()
    yield bouncer
    bouncer.stop()
