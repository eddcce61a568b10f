"""API throttles: per user and per anonymous address, counted in PostgreSQL in one statement.

Each client has a row in `core_throttle_buckets` that every web process shares, so a user's limit
is the same whichever process answers. A rate "N/period" is a bucket of N requests refilled at
N per period (the generic cell rate algorithm: the row keeps one time, when the bucket is next
empty): a burst of N, then one every period/N. A throttled request gets 429 with `Retry-After`
(seconds until the next request is let through).

One statement a request, whatever the rate, with a row of constant size: DRF's own throttle read
and rewrote the client's whole history of requests (a pickled list of up to N times in the cache
table, two statements and a few kilobytes a request at 600/min). Taking a request commits without
waiting for the disk: a database crash may forget the last few requests counted.

The rates come from settings (THROTTLE_USER_RATE, THROTTLE_ANON_RATE) each time a throttle is
made, i.e. per request, rather than DRF's class attribute read once at import: a settings
change (or a test's override) takes effect at once. A rate of None turns that throttle off.
"""

from __future__ import annotations

import math

from django.conf import settings
from django.db import connection
from rest_framework import throttling

# Take one request from the bucket: the row's time moves on by period/N, unless it is more than
# the bucket's depth ahead of now (the bucket is empty), when nothing is written and no row is
# returned. The database's clock only.
_TAKE = """
{commit_mode}INSERT INTO core_throttle_buckets AS bucket (key, tat)
SELECT %(key)s, clock_timestamp() + make_interval(secs => %(emission)s){commit_mode_from}
ON CONFLICT (key) DO UPDATE
   SET tat = GREATEST(bucket.tat, clock_timestamp()) + make_interval(secs => %(emission)s)
 WHERE bucket.tat <= clock_timestamp() + make_interval(secs => %(depth)s)
RETURNING true
"""
# Outside a transaction of the caller's only: inside one, the setting would last to its end.
_TAKE_AUTOCOMMIT = _TAKE.format(
    commit_mode="WITH commit_mode AS (SELECT set_config('synchronous_commit', 'off', true))\n",
    commit_mode_from=" FROM commit_mode",
)
_TAKE_IN_TRANSACTION = _TAKE.format(commit_mode="", commit_mode_from="")
_WAIT = """
SELECT EXTRACT(EPOCH FROM tat - clock_timestamp()) - %(depth)s FROM core_throttle_buckets WHERE key = %(key)s
"""


class _BucketThrottle(throttling.SimpleRateThrottle):
    """DRF's throttle interface and keys, counted in `core_throttle_buckets`."""

    def allow_request(self, request, view) -> bool:
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        emission = self.duration / self.num_requests
        params = {"key": self.key, "emission": emission, "depth": self.duration - emission}
        take = _TAKE_IN_TRANSACTION if connection.in_atomic_block else _TAKE_AUTOCOMMIT
        with connection.cursor() as cursor:
            cursor.execute(take, params)
            if cursor.fetchone() is not None:
                return True
            cursor.execute(_WAIT, params)
            row = cursor.fetchone()
        self._wait = max(float(row[0]) if row else emission, 0.0)
        return False

    def wait(self) -> float | None:
        # At least a second: Retry-After is whole seconds, and 0 would invite an immediate retry.
        return max(1, math.ceil(self._wait))


class UserRateThrottle(_BucketThrottle, throttling.UserRateThrottle):
    """Per signed-in user (token or session); anonymous requests fall through to the IP key."""

    def get_rate(self) -> str | None:
        return settings.THROTTLE_USER_RATE


class AnonRateThrottle(_BucketThrottle, throttling.AnonRateThrottle):
    """Per client address for requests without credentials (THROTTLE_NUM_PROXIES says which)."""

    def get_rate(self) -> str | None:
        return settings.THROTTLE_ANON_RATE


def throttle_buckets_erase(keys: list[str]) -> None:
    """Forget these clients' buckets (a user's erasure)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM core_throttle_buckets WHERE key = ANY(%s::varchar[])", [keys])
