from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from llm.models import LlmUsage
from notes import services
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import BASE_DIR, client_for
from tests.peers.postgres import ThrowawayPostgres

pytestmark = pytest.mark.django_db


def _register_worker(*, seconds_ago: int = 0) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT worker_id FROM procrastinate_register_worker_v1()")
        worker_id = cursor.fetchone()[0]
        cursor.execute(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - make_interval(secs => %s) WHERE id = %s",
            [seconds_ago, worker_id],
        )
    return worker_id


@pytest.fixture
def staff_api() -> APIClient:
    return client_for(make_user("olga", is_staff=True))


def test_healthy_with_a_live_worker_and_reports_jobs_and_budget(settings, staff_api):
    settings.LLM_MONTHLY_BUDGET_USD = 5
    worker_id = _register_worker()
    owner = make_user("hank")
    services.note_create(owner=owner, content="one")
    services.note_create(owner=owner, content="two")
    LlmUsage.objects.create(
        purpose="note_enrichment", model="m", input_tokens=1, output_tokens=1, cost_usd=Decimal("1.25")
    )

    response = staff_api.get("/api/health/")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and body["database"] == "up"
    assert body["jobs"]["enrichment"] == {"todo": 2}
    assert body["workers"] == {"live": 1, "ids": [worker_id]}
    assert body["llm"]["month_spend_usd"] == 1.25
    assert body["llm"]["monthly_budget_usd"] == 5
    assert body["llm"]["budget_exhausted"] is False


def test_unhealthy_without_a_live_worker():
    _register_worker(seconds_ago=600)  # a dead one does not count
    response = APIClient().get("/api/health/")
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy"
    assert "no live worker" in response.json()["reasons"][0]


def _many_rows(n: int) -> None:
    owner = make_user(f"busy{n}")
    recipient = make_recipient(owner)
    for i in range(n):
        services.note_create(owner=owner, content=f"note {i}")
    NotificationJob.objects.bulk_create([NotificationJob(owner=owner, recipient=recipient) for _ in range(n)])
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat) SELECT now() FROM generate_series(1, %s)", [n]
        )


def test_anonymous_health_is_one_query_and_a_summary_whatever_the_rows(staff_api, settings):
    settings.METRICS_TOKEN = "s3cret-scrape-token"
    _register_worker()
    for rows in (1, 300):
        _many_rows(rows)
        with CaptureQueriesContext(connection) as queries:
            response = APIClient().get("/api/health/")
        assert response.status_code == 200
        assert response.json() == {"status": "healthy", "reasons": [], "database": "up"}
        assert len(queries) == 1, [q["sql"] for q in queries]
    # Staff and the metrics token see the details.
    assert "jobs" in staff_api.get("/api/health/").json()
    detailed = APIClient().get("/api/health/", HTTP_AUTHORIZATION="Bearer s3cret-scrape-token").json()
    assert detailed["workers"]["live"] == 302
    assert "jobs" not in APIClient().get("/api/health/", HTTP_AUTHORIZATION="Bearer wrong").json()


def _health_without_database(database_url: str, **headers: str) -> dict:
    script = (
        "import django, json, sys; django.setup();"
        "from django.test import Client;"
        "r = Client().get('/api/health/', **json.loads(sys.argv[1]));"
        "print(json.dumps({'status': r.status_code, 'body': r.json(), 'retry': r.headers.get('Retry-After')}))"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url,
        "DATABASE_CONNECT_TIMEOUT": "2",
        "ALLOWED_HOSTS": "testserver",
        "METRICS_TOKEN": "s3cret-scrape-token",
    }
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(headers)],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_unhealthy_when_the_database_is_down_and_anonymous_callers_learn_nothing_more():
    with ThrowawayPostgres() as pg:
        pg.create_database("secondbrain")
        refused = "postgres://postgres@127.0.0.1:1/secondbrain"  # nothing listens there
        unknown_role = f"postgres://operator_olaf@127.0.0.1:{pg.port}/secondbrain"
        for url, detail in ((refused, "port 1"), (unknown_role, "operator_olaf")):
            outcome = _health_without_database(url)
            assert outcome["status"] == 503 and outcome["retry"] == "5"
            assert outcome["body"] == {"status": "unhealthy", "reasons": ["database unreachable"], "database": "down"}
            # The operator's monitor, with the metrics token, gets the database's own words.
            outcome = _health_without_database(url, HTTP_AUTHORIZATION="Bearer s3cret-scrape-token")
            assert outcome["status"] == 503
            assert outcome["body"]["reasons"][0].startswith("database unreachable: ")
            assert detail in outcome["body"]["reasons"][0]
