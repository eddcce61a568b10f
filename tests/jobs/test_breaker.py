from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobs.tasking.breaker import breaker_check, breaker_record_failure, breaker_record_success, breaker_state

pytestmark = pytest.mark.django_db


def _cool_down(name: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("UPDATE jobs_circuit_breakers SET opened_until = now() WHERE name = %s", [name])


def test_threshold_one_opens_on_the_first_failure():
    assert breaker_check(name="b1", cooldown_seconds=30).clean
    assert breaker_record_failure(name="b1", threshold=1, cooldown_seconds=30) == "open"
    verdict = breaker_check(name="b1", cooldown_seconds=30)
    assert not verdict.allowed
    # The wait is measured on the database's clock (from its `opened_until`), not this host's.
    assert 25 < verdict.retry_in <= 30


def test_the_wait_of_an_open_breaker_does_not_read_this_hosts_clock(monkeypatch):
    breaker_record_failure(name="b-host", threshold=1, cooldown_seconds=60)
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(minutes=10))  # a host ahead
    verdict = breaker_check(name="b-host", cooldown_seconds=60)
    assert not verdict.allowed and 55 < verdict.retry_in <= 60


def test_open_then_one_probe_then_closed_on_success():
    assert breaker_record_failure(name="b2", threshold=2, cooldown_seconds=30) == "closed"
    assert not breaker_check(name="b2", cooldown_seconds=30).clean  # one failure counted
    assert breaker_record_failure(name="b2", threshold=2, cooldown_seconds=30) == "open"
    _cool_down("b2")
    probe = breaker_check(name="b2", cooldown_seconds=30)
    assert probe.allowed and breaker_state(name="b2")["state"] == "half_open"
    assert not breaker_check(name="b2", cooldown_seconds=30).allowed  # only one probe at a time
    breaker_record_success(name="b2")
    assert breaker_state(name="b2") == {"state": "closed", "consecutive_failures": 0, "opened_until": None}


def test_a_failed_probe_opens_it_again():
    for _ in range(2):
        breaker_record_failure(name="b3", threshold=2, cooldown_seconds=30)
    _cool_down("b3")
    assert breaker_check(name="b3", cooldown_seconds=30).allowed
    assert breaker_record_failure(name="b3", threshold=2, cooldown_seconds=30) == "open"
