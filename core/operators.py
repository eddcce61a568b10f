"""Who may read the operational details (job counts, worker ids, spend, the database's error):
active staff, or a scraper holding METRICS_TOKEN. Anonymous callers get a bounded summary."""

from __future__ import annotations

import hmac
from typing import Any

from django.conf import settings
from django.http import HttpRequest


def metrics_token_given(request: HttpRequest) -> bool:
    """`Authorization: Bearer <METRICS_TOKEN>`, compared in constant time; never without a token."""
    token = settings.METRICS_TOKEN
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def may_read_operations(request: HttpRequest, user: Any) -> bool:
    return bool(user.is_active and user.is_staff) or metrics_token_given(request)
