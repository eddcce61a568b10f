"""While the database cannot be reached, every request gets a quick 503 with a retry hint.

A PostgreSQL restart or failover lasts seconds. Without this, the request that finds it down
fails with a 500 and a traceback (or, against a host that drops packets, hangs until the
client gives up). Here a lost or refused connection, on any view (API, admin, dashboard),
answers at once:

    HTTP/1.1 503 Service Unavailable
    Retry-After: 5
    {"detail": "The database is temporarily unavailable; retry in 5 seconds.", "retry_after": 5}

Connections fail fast because the web processes connect with a short `connect_timeout`
(DATABASE_CONNECT_TIMEOUT). Nothing half-done is acknowledged: a request that creates work
writes its rows and its job in one transaction, so a 503 means nothing was queued unless
the commit itself had gone through just before the connection dropped; an `Idempotency-Key`
makes the client's retry safe in that case. Django closes the broken connection at the end of
the request, and the next request connects afresh once the database is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger(__name__)


def retry_later_response(reason: str) -> JsonResponse:
    """503 with Retry-After (DATABASE_RETRY_AFTER_SECONDS): "<reason>; retry in N seconds."."""
    seconds = settings.DATABASE_RETRY_AFTER_SECONDS
    response = JsonResponse({"detail": f"{reason}; retry in {seconds} seconds.", "retry_after": seconds}, status=503)
    response["Retry-After"] = str(seconds)
    return response


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        # DRF's exception handler leaves these to Django, which calls this with the view's error.
        # OperationalError is what psycopg raises for a refused, dropped or shutting-down
        # connection; InterfaceError for one that was already closed.
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        cause = exception.__cause__ or exception
        first_line = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        logger.warning("Database unavailable for %s %s: %s", request.method, request.path, first_line)
        return retry_later_response("The database is temporarily unavailable")
