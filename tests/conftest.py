"""Fixtures only: the helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection
from rest_framework.test import APIClient

from tests.factories import make_user
from tests.helpers import PROCRASTINATE_TABLES, client_for
from tests.peers.claude import FakeClaude
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
