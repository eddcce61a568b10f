"""A circuit breaker whose state lives in PostgreSQL, shared by all workers.

closed --(threshold consecutive transient failures)--> open --(cooldown over)--> half_open:
one caller wins the probe; its success closes the breaker, its failure opens it again.
While open, callers postpone their work instead of burning attempts on a dead server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection
from django.db.models import DateTimeField, Func

from jobs.models import CircuitBreaker

State = CircuitBreaker.State


@dataclass(frozen=True)
class Verdict:
    """`retry_at` is the database's time (for a row or `job_defer(schedule_at=)`); `retry_in` is
    the same moment as seconds from now, for a wait on this host, whose clock may be off the
    database's by minutes (a Postponed's `retry_at` is read on this host's clock)."""

    allowed: bool
    retry_at: datetime | None = None
    clean: bool = False  # closed with no failures counted: a success has nothing to reset
    retry_in: float = 0.0


# A breaker seen closed and clean is taken as such for this long by this process without asking
# the database again (one query less per e-mail); failures seen here forget it at once, and one
# opened by another process is seen within this delay.
CLEAN_CACHE_SECONDS = 1.0
_clean_until: dict[str, float] = {}
_CLOCK = Func(function="clock_timestamp", output_field=DateTimeField())  # the database's time


def breaker_check(*, name: str, cooldown_seconds: float) -> Verdict:
    if _clean_until.get(name, 0.0) > time.monotonic():
        return Verdict(allowed=True, clean=True)
    # Read with the database's time: `opened_until` is written with it, and every worker,
    # whatever its own clock says, must see the breaker open for the same cooldown.
    breaker = CircuitBreaker.objects.filter(name=name).annotate(db_now=_CLOCK).first()
    if breaker is None or breaker.state == State.CLOSED:
        clean = breaker is None or breaker.consecutive_failures == 0
        if clean:
            _clean_until[name] = time.monotonic() + CLEAN_CACHE_SECONDS
        return Verdict(allowed=True, clean=clean)
    now = breaker.db_now
    if breaker.opened_until and now < breaker.opened_until:
        return Verdict(
            allowed=False, retry_at=breaker.opened_until, retry_in=(breaker.opened_until - now).total_seconds()
        )
    # Cooldown over (or a probe that never reported back): one caller wins the probe.
    won = CircuitBreaker.objects.filter(name=name, updated_at=breaker.updated_at).update(
        state=State.HALF_OPEN, opened_until=now + timedelta(seconds=cooldown_seconds), updated_at=now
    )
    if won:
        return Verdict(allowed=True)
    wait = min(cooldown_seconds, 5)
    return Verdict(allowed=False, retry_at=now + timedelta(seconds=wait), retry_in=wait)


def breaker_record_success(*, name: str) -> None:
    # Callers skip this when their check saw a clean breaker, so the hot path stays read-only.
    CircuitBreaker.objects.filter(name=name).exclude(state=State.CLOSED, consecutive_failures=0).update(
        state=State.CLOSED, consecutive_failures=0, opened_until=None, updated_at=_CLOCK
    )


def breaker_record_failure(*, name: str, threshold: int, cooldown_seconds: float) -> str:
    """Count a transient failure; returns the breaker's state afterwards."""
    _clean_until.pop(name, None)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO jobs_circuit_breakers AS b (name, state, consecutive_failures, opened_until, updated_at)
            VALUES (
                %(name)s,
                CASE WHEN %(threshold)s <= 1 THEN 'open' ELSE 'closed' END,
                1,
                CASE WHEN %(threshold)s <= 1 THEN now() + make_interval(secs => %(cooldown)s) END,
                now()
            )
            ON CONFLICT (name) DO UPDATE SET
                consecutive_failures = b.consecutive_failures + 1,
                state = CASE WHEN b.state = 'half_open' OR b.consecutive_failures + 1 >= %(threshold)s
                             THEN 'open' ELSE b.state END,
                opened_until = CASE WHEN b.state = 'half_open' OR b.consecutive_failures + 1 >= %(threshold)s
                                    THEN now() + make_interval(secs => %(cooldown)s) ELSE b.opened_until END,
                updated_at = now()
            RETURNING state
            """,
            {"name": name, "threshold": threshold, "cooldown": cooldown_seconds},
        )
        return cursor.fetchone()[0]


def breaker_state(*, name: str) -> dict:
    breaker = CircuitBreaker.objects.filter(name=name).first()
    if breaker is None:
        return {"state": State.CLOSED, "consecutive_failures": 0, "opened_until": None}
    return {
        "state": breaker.state,
        "consecutive_failures": breaker.consecutive_failures,
        "opened_until": breaker.opened_until,
    }
