"""A database that cannot be reached: every request gets a quick 503 with Retry-After, never a 500.

The web process's connection is pointed at a port where nothing listens (what a client sees
while PostgreSQL restarts: connection refused), then pointed back. `make chaos` does the same
against a real restart, with gunicorn and worker processes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from django.db import connection
from django.test import Client

from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import client_for

pytestmark = pytest.mark.django_db(transaction=True)


class Outage:
    """`with outage:` the connection points at a closed port; after the block, back at the database."""

    def __init__(self) -> None:
        self.up = {key: connection.settings_dict[key] for key in ("HOST", "PORT")}
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.down = {"HOST": "127.0.0.1", "PORT": str(sock.getsockname()[1])}  # nothing listens once closed

    def __enter__(self) -> None:
        connection.close()
        connection.settings_dict.update(self.down)

    def __exit__(self, *exc_info: object) -> None:
        connection.close()
        connection.settings_dict.update(self.up)


@pytest.fixture
def outage() -> Iterator[Outage]:
    outage = Outage()
    try:
        yield outage
    finally:
        outage.__exit__()


def _assert_unavailable(response, *, retry_after: int = 5) -> None:
    assert response.status_code == 503, response.content
    assert response["Retry-After"] == str(retry_after)
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert "temporarily unavailable" in body["detail"]
    assert body["retry_after"] == retry_after


def test_send_email_while_the_database_is_down_is_a_503_with_retry_after_and_queues_nothing(user, outage):
    recipient = make_recipient(user)
    api = client_for(user)

    with outage:
        started = time.monotonic()
        response = api.post(
            "/api/notifications/send-email/",
            {"recipient_id": recipient.id, "subject": "Hi", "body": "Hello"},
            format="json",
        )
        elapsed = time.monotonic() - started
    _assert_unavailable(response)
    assert elapsed < 5  # refused at once, not a wait for a timeout
    assert NotificationJob.objects.count() == 0


def test_reads_and_signed_in_admin_pages_get_the_same_503(user, settings, outage):
    settings.DATABASE_RETRY_AFTER_SECONDS = 7
    api = client_for(user)
    browser = Client()
    browser.force_login(make_user("root", is_staff=True, is_superuser=True))
    with outage:
        _assert_unavailable(api.get("/api/notes/"), retry_after=7)
        _assert_unavailable(api.get("/api/jobs/"), retry_after=7)
        _assert_unavailable(browser.get("/admin/"), retry_after=7)


def test_requests_succeed_again_once_the_database_is_back(user, outage):
    api = client_for(user)
    with outage:
        _assert_unavailable(api.get("/api/notes/"))
    assert api.get("/api/notes/").status_code == 200


def test_other_errors_are_not_turned_into_503(user):
    """Only a database that cannot be reached is a 503: a bad request stays a 400."""
    api = client_for(user)
    response = api.post("/api/notifications/send-email/", {"recipient_id": "x"}, format="json")
    assert response.status_code == 400
