"""The OpenAPI schema's error responses, documented once for every operation.

drf-spectacular documents what a view returns when all goes well. A client (or a fuzzer such
as schemathesis) also meets the errors every DRF view can answer: 400 for a body or query that
does not validate or parse, 401 without valid credentials, 404 for an object that is not yours
or a page past the end, 413 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE, 415 for a body in a
media type the view does not parse, 429 when throttled, 503 while the database is away.
`AutoSchema` adds those that can happen to each operation, unless the view documents that
status itself with `extend_schema`.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import ResolvedComponent, build_object_type
from rest_framework import permissions, serializers


class ErrorSerializer(serializers.Serializer):
    """Every error that is not about a field: {"detail": "..."}."""

    detail = serializers.CharField()


ERROR_DESCRIPTIONS = {
    "400": "The body or query did not parse or validate.",
    "401": "No valid credentials: send `Authorization: Token <key>`.",
    "403": "Authenticated, but not allowed to do this.",
    "404": "Not found, or not yours.",
    "409": "The object is not in a state that allows this, or a request with this Idempotency-Key is still running.",
    "413": "The request body is too large.",
    "415": "The body's media type is not accepted here.",
    "422": "This Idempotency-Key was used with another request.",
    "429": "Too many requests: wait the seconds in `Retry-After`.",
    "503": "The database is unavailable for a moment: retry after the seconds in `Retry-After`.",
}

_VALIDATION_ERROR = build_object_type(
    description=(
        'Field errors, `{"field": ["message", ...]}` (nested for nested fields, `non_field_errors` for the '
        'whole object), or `{"detail": "message"}` for a body that does not parse.'
    ),
    additionalProperties={},
)


class AutoSchema(SpectacularAutoSchema):
    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        responses = operation["responses"]
        for code in self._error_codes(operation):
            if code not in responses:
                responses[code] = self._error_response(code)
        for code, response in responses.items():
            # A view that declares an error with only a description still answers {"detail": ...}.
            if code >= "400" and "content" not in response:
                response["content"] = self._error_response(code)["content"]
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def _error_codes(self, operation: dict[str, Any]) -> list[str]:
        parameters = operation.get("parameters", [])
        # Only a documented body is parsed; a view without one that answers 400 declares it.
        has_body = "requestBody" in operation
        codes = []
        if has_body or any(p.get("in") in ("query", "header") for p in parameters):
            codes.append("400")
        if not self._allows_anonymous():
            codes.append("401")
        if any(p.get("in") == "path" for p in parameters) or self._is_paginated_list():
            codes.append("404")
        if has_body:
            codes += ["413", "415"]
        if any(p.get("in") == "header" and p.get("name") == "Idempotency-Key" for p in parameters):
            codes += ["409", "422"]  # core/idempotency.py
        if self.view.get_throttles():
            codes.append("429")
        codes.append("503")  # core/middleware.py, while the database cannot be reached
        return codes

    def get_auth(self) -> list[dict[str, Any]]:
        auths = super().get_auth()
        # No permission class at all (DRF's obtain_auth_token) lets anyone in, as AllowAny does.
        if self._allows_anonymous() and {} not in auths:
            auths.append({})
        return auths

    def _allows_anonymous(self) -> bool:
        checks = self.view.get_permissions()
        return not checks or any(isinstance(p, permissions.AllowAny) for p in checks)

    def _is_paginated_list(self) -> bool:
        # A page number past the end is a 404 (DRF's PageNumberPagination).
        return self.method == "GET" and self._is_list_view() and self._get_paginator() is not None

    def _error_response(self, code: str) -> dict[str, Any]:
        if code == "400":
            component = ResolvedComponent(
                name="ValidationError",
                type=ResolvedComponent.SCHEMA,
                object="ValidationError",
                schema=_VALIDATION_ERROR,
            )
            self.registry.register_on_missing(component)
            schema = component.ref
        else:
            schema = self.resolve_serializer(ErrorSerializer(), "response").ref
        response: dict[str, Any] = {
            "description": ERROR_DESCRIPTIONS.get(code, ""),
            "content": {"application/json": {"schema": schema}},
        }
        if code == "401":
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Token`"}}
        if code in ("429", "503"):
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
        return response


def lib_doc_excludes() -> list[type]:
    """Where a schema component's description stops looking through a serializer's base classes
    for a docstring: drf-spectacular's own list, and our serializer bases, whose docstrings are
    written for this code's readers, not for the API's."""
    from drf_spectacular.plumbing import get_lib_doc_excludes

    from core.serializers import ModelSerializer, SharedFields

    return [*get_lib_doc_excludes(), ModelSerializer, SharedFields]
