"""Rate limits enforced in PostgreSQL, so they hold across every worker and web process.

A token bucket per key: `rate` tokens per second, at most `burst` banked. Taking a token is
one UPDATE of one row under its row lock, with the database clock as the only clock.
"""

from __future__ import annotations

import time

from django.db import connection

_TAKE = """
WITH bucket AS (
    SELECT key, LEAST(%(burst)s, tokens + EXTRACT(EPOCH FROM clock_timestamp() - updated_at) * %(rate)s) AS available
      FROM jobs_rate_limit_buckets
     WHERE key = %(key)s
       FOR UPDATE
){commit_mode}
UPDATE jobs_rate_limit_buckets AS b
   SET tokens = CASE WHEN bucket.available >= 1 THEN bucket.available - 1 ELSE bucket.available END,
       updated_at = clock_timestamp()
  FROM bucket{commit_mode_from}
 WHERE b.key = bucket.key
RETURNING bucket.available
"""
# Outside a transaction of the caller's, a token's commit need not wait for the disk: a database
# crash can at worst forget a few tokens taken in its last moments (a few sends over the limit).
_TAKE_AUTOCOMMIT = _TAKE.format(
    commit_mode=", commit_mode AS (SELECT set_config('synchronous_commit', 'off', true))",
    commit_mode_from=", commit_mode",
)
_TAKE_IN_TRANSACTION = _TAKE.format(commit_mode="", commit_mode_from="")
_CREATE = """
INSERT INTO jobs_rate_limit_buckets (key, tokens, updated_at)
VALUES (%(key)s, %(burst)s, clock_timestamp())
ON CONFLICT (key) DO NOTHING
"""


def rate_limit_try_acquire(*, key: str, rate: float, burst: float | None = None) -> float:
    """Take one token. Returns 0 when taken, else the seconds to wait before trying again.

    One statement (one round trip) once the bucket exists."""
    params = {"key": key, "rate": float(rate), "burst": float(burst or rate)}
    take = _TAKE_IN_TRANSACTION if connection.in_atomic_block else _TAKE_AUTOCOMMIT
    with connection.cursor() as cursor:
        cursor.execute(take, params)
        row = cursor.fetchone()
        if row is None:  # the bucket's first use
            cursor.execute(_CREATE, params)
            cursor.execute(take, params)
            row = cursor.fetchone()
    available = float(row[0])
    return 0.0 if available >= 1 else (1 - available) / params["rate"]


def rate_limit_wait(*, key: str, rate: float, burst: float | None = None, max_wait: float = 60.0) -> float:
    """Block until a token is taken (the job waits; it neither fails nor burns an attempt).

    Returns the seconds waited. Raises TimeoutError past `max_wait`.
    """
    waited = 0.0
    while (wait := rate_limit_try_acquire(key=key, rate=rate, burst=burst)) > 0:
        if waited + wait > max_wait:
            raise TimeoutError(f"rate limit {key!r}: no token within {max_wait:g} s")
        time.sleep(wait)
        waited += wait
    return waited


def rate_limit_refund(*, key: str) -> None:
    """Give back a token taken for work that did not go ahead (another limit refused it)."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE jobs_rate_limit_buckets SET tokens = tokens + 1 WHERE key = %s", [key])
