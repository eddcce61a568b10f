"""Completion webhooks: a job deferred with a `callback_url` is POSTed its final status and
result when it ends.

The database queues the delivery (trigger `jobs_on_job_status_change`, migration 0002) in the
same transaction that ends the job; `jobs.webhook_deliver` then POSTs it, retried with backoff.

- Only hosts in `JOBS_WEBHOOK_ALLOWED_HOSTS` are called (checked when the job is created and
  again before each POST; redirects are not followed), so a client cannot make the service
  call an arbitrary internal address.
- Each POST carries `X-Secondbrain-Timestamp: <unix seconds>` and
  `X-Secondbrain-Signature: sha256=<hex>`, the HMAC-SHA256 of "<timestamp>.<body>" under
  `JOBS_WEBHOOK_SECRET`.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
from urllib.parse import urlsplit

from django.conf import settings
from rest_framework import status

from core.errors import ApplicationError, ProviderError


def webhook_host_allowed(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    for allowed in settings.JOBS_WEBHOOK_ALLOWED_HOSTS:
        allowed = allowed.lower()
        if host == allowed or (allowed.startswith(".") and host.endswith(allowed)):
            return True
    return False


def webhook_url_check(url: str) -> None:
    """Refuse (400, naming the field) a callback URL whose host is not allowed."""
    if not webhook_host_allowed(url):
        raise ApplicationError(
            "Invalid callback URL.",
            status_code=status.HTTP_400_BAD_REQUEST,
            extra={"callback_url": ["Must be an http(s) URL on a host listed in JOBS_WEBHOOK_ALLOWED_HOSTS."]},
        )


def webhook_signature(*, body: bytes, timestamp: int, secret: str | None = None) -> str:
    key = (secret or settings.JOBS_WEBHOOK_SECRET).encode()
    return "sha256=" + hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def webhook_post(*, url: str, payload: dict) -> int:
    """POST `payload` signed; returns the HTTP status. Raises ProviderError (transient or not)."""
    if not webhook_host_allowed(url):
        raise ProviderError(f"callback host of {url!r} is not in JOBS_WEBHOOK_ALLOWED_HOSTS", permanent=True)
    body = json.dumps(payload, default=str).encode()
    timestamp = int(time.time())
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(parts.hostname, parts.port, timeout=settings.JOBS_WEBHOOK_TIMEOUT_SECONDS)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "secondbrain-webhooks",
                "X-Secondbrain-Timestamp": str(timestamp),
                "X-Secondbrain-Signature": webhook_signature(body=body, timestamp=timestamp),
            },
        )
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ProviderError(f"callback to {parts.hostname} failed: {exc}", permanent=False) from exc
    finally:
        conn.close()
    if 200 <= response.status < 300:
        return response.status
    transient = response.status >= 500 or response.status in (408, 409, 425, 429)
    raise ProviderError(f"callback answered HTTP {response.status}", permanent=not transient)
