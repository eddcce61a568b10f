"""Rate limits enforced in PostgreSQL, so they hold across every worker and web process.

A token bucket per key: `rate` tokens per second, at most `burst` banked. Taking a token is
one UPDATE of one row under its row lock, with the database clock as the only clock.
"""

from __future__ import annotations

import threading
import time

from django.db import connection

# Take up to %(want)s whole tokens: as many as the bucket holds, at most that many.
_TAKE = """
WITH bucket AS (
    SELECT key, LEAST(%(burst)s, tokens + EXTRACT(EPOCH FROM clock_timestamp() - updated_at) * %(rate)s) AS available
      FROM jobs_rate_limit_buckets
     WHERE key = %(key)s
       FOR UPDATE
){commit_mode}
UPDATE jobs_rate_limit_buckets AS b
   SET tokens = bucket.available - LEAST(floor(bucket.available), %(want)s),
       updated_at = clock_timestamp()
  FROM bucket{commit_mode_from}
 WHERE b.key = bucket.key
RETURNING bucket.available, LEAST(floor(bucket.available), %(want)s)::int
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


def rate_limit_take(*, key: str, rate: float, burst: float | None = None, want: int = 1) -> tuple[int, float]:
    """Take up to `want` tokens. Returns (how many were taken, the seconds to wait before
    another try when none was). One statement (one round trip) once the bucket exists."""
    params = {"key": key, "rate": float(rate), "burst": float(burst or rate), "want": max(1, int(want))}
    take = _TAKE_IN_TRANSACTION if connection.in_atomic_block else _TAKE_AUTOCOMMIT
    with connection.cursor() as cursor:
        cursor.execute(take, params)
        row = cursor.fetchone()
        if row is None:  # the bucket's first use
            cursor.execute(_CREATE, params)
            cursor.execute(take, params)
            row = cursor.fetchone()
    available, taken = float(row[0]), int(row[1])
    return taken, 0.0 if taken else (1 - available) / params["rate"]


def rate_limit_try_acquire(*, key: str, rate: float, burst: float | None = None) -> float:
    """Take one token. Returns 0 when taken, else the seconds to wait before trying again."""
    return rate_limit_take(key=key, rate=rate, burst=burst)[1]


# Tokens this process has taken from a bucket and not used yet: {key: (count, use before)}.
# Taking a block of them at once makes a busy limit one UPDATE of its row per block instead of
# per unit of work, so many workers do not queue on that one row. A block is at most 50 ms of
# the rate and is dropped when not used within that time, so the limit is never exceeded and
# a process that dies leaves at most one block unused.
_reserve: dict[str, tuple[int, float]] = {}
_reserve_lock = threading.Lock()
BLOCK_SECONDS = 0.05


def rate_limit_wait(*, key: str, rate: float, burst: float | None = None, max_wait: float = 60.0) -> float:
    """Block until a token is taken (the job waits; it neither fails nor burns an attempt).

    Returns the seconds waited. Raises TimeoutError past `max_wait`.
    """
    block = max(1, min(int(rate * BLOCK_SECONDS), int(burst or rate)))
    waited = 0.0
    while True:
        with _reserve_lock:
            count, use_before = _reserve.get(key, (0, 0.0))
            if count > 0 and time.monotonic() < use_before:
                _reserve[key] = (count - 1, use_before)
                return waited
        taken, wait = rate_limit_take(key=key, rate=rate, burst=burst, want=block)
        if taken:
            with _reserve_lock:
                _reserve[key] = (taken - 1, time.monotonic() + BLOCK_SECONDS)
            return waited
        if waited + wait > max_wait:
            raise TimeoutError(f"rate limit {key!r}: no token within {max_wait:g} s")
        time.sleep(wait)
        waited += wait


def rate_limit_refund(*, key: str) -> None:
    """Give back a token taken for work that did not go ahead (another limit refused it)."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE jobs_rate_limit_buckets SET tokens = tokens + 1 WHERE key = %s", [key])
