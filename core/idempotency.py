"""`Idempotency-Key` for the POST endpoints that create work: a repeated request does it once.

    class SendEmailApi(APIView):
        @idempotent
        def post(self, request): ...

A client that does not know whether its POST arrived (a timeout, a dropped connection) sends it
again with the same header, and gets the first answer instead of a second e-mail or note.

What a client sees (per user; keys of different users never meet):

- no header: the view runs as always.
- a new key (or one older than IDEMPOTENCY_KEY_TTL_SECONDS): the view runs. A success (2xx)
  is stored under the key: status and body.
- the same key again with the same method, path, query and body: the stored status and body,
  with `Idempotent-Replayed: true`. The view does not run; nothing new is created.
- the same key with another body (or on another endpoint): 422, nothing runs.
- the same key while its first request is still running: 409 with `Retry-After: 1`.
- an empty key, one over 255 characters, or one with spaces or non-ASCII characters: 400.
- a request that fails (400 from validation, 409 from a domain rule, a crash) stores nothing,
  so a retry with the same key runs it again: there was no work to protect.

Design: the view runs inside one transaction that also holds the key.

1. `pg_try_advisory_xact_lock` on (user, key). PostgreSQL grants it to one transaction only, so
   of two identical requests arriving together one runs and the other gets 409 at once, without
   waiting for the first and without a window between "look" and "claim".
2. Holding the lock, look the key up: a stored response is replayed (or refused with 422).
3. Otherwise run the view, and insert the key's row with the view's response in the same
   transaction as the view's writes and deferred jobs. They commit together: a crash before the
   commit leaves neither the work nor the key (the client's retry does the work once), a crash
   after it leaves both (the retry gets the stored response). The commit releases the lock after
   making the row visible, so whoever takes the lock next sees the row.

The unique constraint on (user, key) backs the lock. The body is compared by a hash of its parsed
form (JSON as sorted canonical JSON, form fields as lists, uploaded files by name, size, type and
a sha256 of their bytes), so a resent multipart upload matches though its boundary differs.
The stored body is the response data as JSON text, so a replay renders the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.http import QueryDict
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.encoders import JSONEncoder

from core import services
from core.errors import ApplicationError
from core.parsers import NESTED_TOO_DEEPLY

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# Visible ASCII, no spaces: what fits any client's header and any log line unescaped.
_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}")

_PARAMETER = OpenApiParameter(
    name=HEADER,
    type={"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": r"^[\x21-\x7e]+$"},
    location=OpenApiParameter.HEADER,
    required=False,
    description=(
        "Makes a retry safe: a repeat with the same key and body returns the first response and "
        "creates nothing (422 with another body, 409 while the first is still running)."
    ),
)


class IdempotencyKeyInUse(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = (
        "A request with this Idempotency-Key is still being processed. Retry it shortly to get its response."
    )
    default_code = "idempotency_key_in_use"
    wait = 1  # DRF's handler turns this into Retry-After


def idempotency_key(request: Request) -> str | None:
    """The request's key, None without the header; a 400 naming the header when it is malformed."""
    value = request.META.get("HTTP_IDEMPOTENCY_KEY")
    if value is None:
        return None
    if not _KEY.fullmatch(value):
        raise exceptions.ValidationError(
            {HEADER: [f"Must be 1 to {MAX_KEY_LENGTH} visible ASCII characters (no spaces), e.g. a UUID."]}
        )
    return value


def _canonical(value: Any) -> Any:
    if isinstance(value, QueryDict):
        return {key: [_canonical(item) for item in items] for key, items in value.lists()}
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, UploadedFile):
        digest = hashlib.sha256()
        for chunk in value.chunks():
            digest.update(chunk)
        value.seek(0)  # the view reads it next
        return {"file": value.name, "size": value.size, "type": value.content_type, "sha256": digest.hexdigest()}
    return value


def request_hash(request: Request) -> str:
    """sha256 of the query parameters and the parsed body (a malformed body is the parser's 400)."""
    try:
        canonical = {"query": _canonical(request.query_params), "body": _canonical(request.data)}
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    except RecursionError as exc:
        # The parser accepts nesting up to the recursion limit at its own depth in the stack;
        # walking the body again here, deeper in the stack and two frames per level, may not.
        raise exceptions.ParseError(NESTED_TOO_DEEPLY) from exc
    return hashlib.sha256(text.encode()).hexdigest()


def idempotent(view_method: Callable[..., Response]) -> Callable[..., Response]:
    """Make a DRF view's POST handler honour `Idempotency-Key` (see the module's docstring).

    Put it on the handler (`post`, `create`, an `@action`; above `@action`), which DRF calls
    after authentication, permissions and throttles. It adds the header to the OpenAPI schema.
    """

    @functools.wraps(view_method)
    def handler(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = idempotency_key(request)
        if key is None or not request.user.is_authenticated:
            return view_method(self, request, *args, **kwargs)
        fingerprint = request_hash(request)
        with transaction.atomic():
            locked, stored = services.idempotency_key_lock(user_id=request.user.pk, key=key)
            if not locked:
                raise IdempotencyKeyInUse()
            if stored is not None:
                if (stored.method, stored.path) != (request.method, request.path):
                    raise ApplicationError(
                        f"This {HEADER} was used for another request ({stored.method} {stored.path}). "
                        "Use a new key for a new request.",
                        status_code=status.HTTP_422_UNPROCESSABLE_ENTITY,
                    )
                if stored.request_hash != fingerprint:
                    raise ApplicationError(
                        f"This {HEADER} was used with a different request body. Use a new key for a new request.",
                        status_code=status.HTTP_422_UNPROCESSABLE_ENTITY,
                    )
                return Response(
                    json.loads(stored.response_body),
                    status=stored.response_status,
                    headers={REPLAYED_HEADER: "true"},
                )
            response = view_method(self, request, *args, **kwargs)
            if status.is_success(response.status_code):
                services.idempotency_key_store(
                    user_id=request.user.pk,
                    key=key,
                    method=request.method,
                    path=request.path,
                    request_hash=fingerprint,
                    status=response.status_code,
                    # ASCII-escaped: PostgreSQL text cannot hold a NUL, JSON's \u0000 can.
                    body=json.dumps(getattr(response, "data", None), cls=JSONEncoder),
                )
            return response

    return extend_schema(parameters=[_PARAMETER])(handler)


class IdempotentCreateMixin:
    """For a ModelViewSet: `POST` to the list (create) honours `Idempotency-Key`."""

    @idempotent
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().create(request, *args, **kwargs)
