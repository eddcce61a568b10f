"""Daily quotas per key (e-mails per user, LLM dollars per user), race-free across processes.

    taken = quota_take(key=f"email:{user_id}", amount=1, limit=100)
    if not taken.allowed:   # nothing was counted
        ... refuse, with taken.retry_after (seconds until the UTC day ends)

One row per key and UTC day (table `core_quota_counters`), changed only by one conditional
upsert: `used + amount <= limit`. PostgreSQL's row lock orders concurrent takes and re-checks the
condition on the row the first one wrote, so two requests at `limit - 1` never both pass. Call
it inside the transaction of the work it pays for: a rolled-back request gives its share back.
The day is the database's (one clock for every host).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from django.db import connection

_TAKE = """
WITH today AS (SELECT (now() AT TIME ZONE 'UTC')::date AS day)
INSERT INTO core_quota_counters AS c (key, day, used)
SELECT %(key)s, today.day, %(amount)s FROM today WHERE %(amount)s <= %(limit)s
    ON CONFLICT (key, day) DO UPDATE SET used = c.used + EXCLUDED.used
 WHERE c.used + EXCLUDED.used <= %(limit)s
RETURNING c.day, c.used
"""
_REFUSED = """
SELECT (now() AT TIME ZONE 'UTC')::date,
       coalesce((SELECT used FROM core_quota_counters
                  WHERE key = %(key)s AND day = (now() AT TIME ZONE 'UTC')::date), 0),
       ceil(extract(epoch FROM date_trunc('day', now() AT TIME ZONE 'UTC') + interval '1 day'
                               - (now() AT TIME ZONE 'UTC')))::int
"""
_ADJUST = """
UPDATE core_quota_counters SET used = greatest(used + %(delta)s, 0) WHERE key = %(key)s AND day = %(day)s
"""


@dataclass(frozen=True)
class QuotaTaken:
    allowed: bool
    day: date
    used: Decimal  # after this take when allowed, else what the day had already used
    retry_after: int = 0  # seconds until the day (UTC) ends, when refused


def quota_erase(*, key: str) -> None:
    """Forget every day counted under `key` (its user is being erased, core/erasure.py)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM core_quota_counters WHERE key = %s", [key])


def quota_take(*, key: str, amount: Decimal | int, limit: Decimal | int) -> QuotaTaken:
    """Count `amount` against today's `limit` for `key`, all or nothing."""
    params = {"key": key, "amount": Decimal(amount), "limit": Decimal(limit)}
    with connection.cursor() as cursor:
        cursor.execute(_TAKE, params)
        row = cursor.fetchone()
        if row is not None:
            return QuotaTaken(allowed=True, day=row[0], used=row[1])
        cursor.execute(_REFUSED, params)
        day, used, retry_after = cursor.fetchone()
    return QuotaTaken(allowed=False, day=day, used=used, retry_after=max(int(retry_after), 1))


def quota_adjust(*, key: str, day: date, delta: Decimal | int) -> None:
    """Correct a take once the real amount is known (an estimate settled, a refund). Never
    refused: the work has happened. Never below zero."""
    with connection.cursor() as cursor:
        cursor.execute(_ADJUST, {"key": key, "day": day, "delta": Decimal(delta)})
