"""API throttles: DRF's per-user and per-address throttles, counted in the database cache.

The counters live in Django's database cache (the `core_cache` table, PostgreSQL), so every web
process and every gunicorn worker shares them: a user's limit is the same whichever process
answers. A throttled request gets 429 with `Retry-After` (seconds until a slot frees up).

The rates come from settings (THROTTLE_USER_RATE, THROTTLE_ANON_RATE) each time a throttle is
made, i.e. per request, rather than DRF's class attribute read once at import: a settings
change (or a test's override) takes effect at once. A rate of None turns that throttle off.

DRF counts with a read-modify-write of the history list, so two requests of one user landing in
the same millisecond may both pass where only one slot was left; a limit, not an exact quota.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework import throttling


class UserRateThrottle(throttling.UserRateThrottle):
    """Per signed-in user (token or session); anonymous requests fall through to the IP key."""

    def get_rate(self) -> str | None:
        return settings.THROTTLE_USER_RATE


class AnonRateThrottle(throttling.AnonRateThrottle):
    """Per client address for requests without credentials (THROTTLE_NUM_PROXIES says which)."""

    def get_rate(self) -> str | None:
        return settings.THROTTLE_ANON_RATE
