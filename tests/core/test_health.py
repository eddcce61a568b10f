from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest
from django.db import connection
from rest_framework.test import APIClient

from llm.models import LlmUsage
from notes import services
from tests.conftest import BASE_DIR
from tests.factories import make_user

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


def test_healthy_with_a_live_worker_and_reports_jobs_and_budget(settings):
    settings.LLM_MONTHLY_BUDGET_USD = 5
    worker_id = _register_worker()
    owner = make_user("hank")
    services.note_create(owner=owner, content="one")
    services.note_create(owner=owner, content="two")
    LlmUsage.objects.create(
        purpose="note_enrichment", model="m", input_tokens=1, output_tokens=1, cost_usd=Decimal("1.25")
    )

    response = APIClient().get("/api/health/")

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


def test_unhealthy_when_the_database_is_down():
    script = (
        "import django, json; django.setup();"
        "from django.test import Client;"
        "r = Client().get('/api/health/');"
        "print(json.dumps({'status': r.status_code, 'body': r.json(), 'retry': r.headers.get('Retry-After')}))"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/secondbrain",
        "DATABASE_CONNECT_TIMEOUT": "2",
        "ALLOWED_HOSTS": "testserver",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 503
    assert outcome["body"]["database"] == "down"
    assert outcome["body"]["reasons"][0].startswith("database unreachable")
    assert outcome["retry"] == "5"
