"""One error type for the domain, mapped to a clear 4xx JSON body by one DRF handler."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class ApplicationError(Exception):
    """A domain rule was broken; `status_code` says which 4xx the API answers."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = status.HTTP_400_BAD_REQUEST,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.extra = extra or {}
        self.headers = headers or {}  # e.g. Retry-After on a 429


class ProviderError(Exception):
    """An external provider (Claude, the mail server) failed. Retry only when not permanent."""

    def __init__(self, message: str, *, permanent: bool, detail: str = "") -> None:
        super().__init__(message)
        self.permanent = permanent
        # What the provider said, which may quote personal data back (a refused address, a
        # name): kept in the app's own delivery records, never in job rows, tracebacks or logs.
        self.detail = detail or message


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApplicationError):
        return Response({"detail": exc.message, **exc.extra}, status=exc.status_code, headers=exc.headers)
    if isinstance(exc, RequestDataTooBig):
        # Raised by request.body past DATA_UPLOAD_MAX_MEMORY_SIZE, before anything is parsed.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response(
            {"detail": f"The request body is larger than the limit of {limit} bytes."},
            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, SuspiciousOperation):
        # Too many form fields or files, a malformed multipart body: the client's fault, in JSON.
        return Response({"detail": "The request could not be read."}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, exceptions.ValidationError) and isinstance(exc.detail, list):
        # Raised outside a serializer (e.g. SearchFilter on a NUL): an object like every other error.
        exc = exceptions.ValidationError({"detail": " ".join(str(message) for message in exc.detail)})
    return drf_exception_handler(exc, context)
