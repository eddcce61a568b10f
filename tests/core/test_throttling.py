"""API throttling (core/throttling.py): per user and per anonymous address, counted in one
PostgreSQL table that every web process shares, one statement a request; 429 with Retry-After."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from notes.models import Note
from tests.factories import make_user
from tests.helpers import BASE_DIR, client_for, database_url


def _buckets_clear() -> None:
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM core_throttle_buckets")


@pytest.fixture
def rates(settings):
    """Small rates, and no counters left by an earlier test."""
    settings.THROTTLE_USER_RATE = "3/min"
    settings.THROTTLE_ANON_RATE = "2/min"
    _buckets_clear()
    yield settings
    _buckets_clear()


def _bucket_keys(fragment: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT key FROM core_throttle_buckets WHERE key LIKE %s", [f"%{fragment}%"])
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db
def test_a_users_limit_is_shared_by_all_their_clients_and_answers_429_with_retry_after(rates, user, other_user):
    laptop, phone = client_for(user), client_for(user)
    for client in (laptop, phone, laptop):
        assert client.get("/api/notes/").status_code == 200
    throttled = phone.get("/api/notes/")
    assert throttled.status_code == 429
    assert 1 <= int(throttled["Retry-After"]) <= 60
    assert "throttled" in throttled.json()["detail"]
    # Writes count too, and a throttled request does nothing.
    assert laptop.post("/api/notes/", {"content": "c"}, format="json").status_code == 429
    assert not Note.objects.filter(owner=user).exists()
    # Another user has their own budget.
    assert client_for(other_user).get("/api/notes/").status_code == 200
    # The counter is a row in PostgreSQL, not a process's memory.
    assert _bucket_keys(f"throttle_user_{user.pk}") == [f"throttle_user_{user.pk}"]


def _guess(client, **headers):
    """An anonymous request: a password guess at the token endpoint (400 when wrong)."""
    return client.post("/api/auth/token/", {"username": "alice", "password": "guess"}, **headers)


@pytest.mark.django_db
def test_anonymous_clients_are_limited_per_address_and_forwarded_for_is_not_trusted(rates):
    client = APIClient(REMOTE_ADDR="203.0.113.7")
    for _ in range(2):
        assert _guess(client).status_code == 400
    throttled = _guess(client)
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) >= 1
    # A made-up X-Forwarded-For does not buy a new budget (THROTTLE_NUM_PROXIES is 0).
    assert _guess(client, HTTP_X_FORWARDED_FOR="198.51.100.1").status_code == 429
    # The schema is public and counted the same way.
    assert client.get("/api/schema/").status_code == 429
    # Another address is another client.
    assert _guess(APIClient(REMOTE_ADDR="203.0.113.8")).status_code == 400
    # Without credentials a private endpoint is a 401 whatever the count: refused before counting.
    assert client.get("/api/notes/").status_code == 401


@pytest.mark.django_db
def test_behind_a_proxy_the_forwarded_address_is_the_client(rates):
    rates.REST_FRAMEWORK = {**rates.REST_FRAMEWORK, "NUM_PROXIES": 1}
    proxy = APIClient(REMOTE_ADDR="10.0.0.2")
    for _ in range(2):
        assert _guess(proxy, HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 400
    assert _guess(proxy, HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 429
    assert _guess(proxy, HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 400


@pytest.mark.django_db
def test_health_is_never_throttled(rates, client):
    rates.THROTTLE_ANON_RATE = "1/min"
    assert all(client.get("/api/health/").status_code != 429 for _ in range(3))


@pytest.mark.django_db
def test_a_rate_of_none_turns_a_throttle_off(rates, user):
    rates.THROTTLE_USER_RATE = None
    api = client_for(user)
    assert all(api.get("/api/notes/").status_code == 200 for _ in range(5))


@pytest.mark.django_db(transaction=True)
def test_another_web_process_spends_the_same_budget(settings):
    """Two requests from a separate process (its own settings, connection and memory), then this
    process may make one more: the count lives in PostgreSQL."""
    user = make_user("pat")
    token = client_for(user)._credentials["HTTP_AUTHORIZATION"]
    _buckets_clear()
    script = (
        "import django; django.setup()\n"
        "from django.test import Client\n"
        f"c = Client(HTTP_AUTHORIZATION={token!r})\n"
        "print(*[c.get('/api/notes/').status_code for _ in range(2)])\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "ALLOWED_HOSTS": "testserver",
        "THROTTLE_USER_RATE": "3/min",
    }
    other = subprocess.run(
        [sys.executable, "-c", script], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert other.stdout.split() == ["200", "200"], other.stderr

    settings.THROTTLE_USER_RATE = "3/min"
    api = client_for(user)
    assert api.get("/api/notes/").status_code == 200
    assert api.get("/api/notes/").status_code == 429
    _buckets_clear()


def test_a_malformed_rate_stops_the_start_with_the_variables_name():
    env = {**os.environ, "DEBUG": "true", "THROTTLE_USER_RATE": "lots"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "THROTTLE_USER_RATE" in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.django_db
def test_a_request_is_counted_in_one_statement_on_a_row_of_constant_size(rates, user):
    # DRF's own throttle read and rewrote the client's whole history (a pickled list of up to N
    # times in the cache table): two statements, and kilobytes a request at 600/min.
    rates.THROTTLE_USER_RATE = "600/min"
    api = client_for(user)
    sizes = []
    for _ in range(50):
        with CaptureQueriesContext(connection) as queries:
            assert api.get("/api/notes/").status_code == 200
        counting = [q["sql"] for q in queries.captured_queries if "core_throttle_buckets" in q["sql"]]
        assert len(counting) == 1
        assert not [q for q in queries.captured_queries if "core_cache" in q["sql"]]
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_column_size(b.*) FROM core_throttle_buckets AS b WHERE key = %s",
                [f"throttle_user_{user.pk}"],
            )
            sizes.append(cursor.fetchone()[0])
    assert len(set(sizes)) == 1


@pytest.mark.django_db
def test_a_burst_of_the_rate_then_one_request_per_share_of_the_period(rates, user):
    # "2/s": a bucket of two requests, refilled at one every half second.
    rates.THROTTLE_USER_RATE = "2/s"
    api = client_for(user)
    assert [api.get("/api/notes/").status_code for _ in range(2)] == [200, 200]
    throttled = api.get("/api/notes/")
    assert throttled.status_code == 429 and throttled["Retry-After"] == "1"
    time.sleep(0.6)
    assert api.get("/api/notes/").status_code == 200
    assert api.get("/api/notes/").status_code == 429
