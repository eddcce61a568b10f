"""OpenTelemetry traces across the job boundary, off unless configured.

One trace holds a request (`TracingMiddleware`), the jobs it deferred (each attempt a span,
jobs/engine/middleware.py) and their provider calls (`provider_span`: SMTP, Claude, webhooks).
The deferring side's W3C trace context rides in the job row (`procrastinate_jobs.trace_context`,
migration jobs 0013), written by the defer statement from `trace_carrier()`.

Off (`TRACING_ENABLED` false, the default without an `OTEL_EXPORTER_OTLP_*ENDPOINT`): the SDK is
never imported, `tracer()` is None, and every hook here is a None check. On: spans go through a
BatchSpanProcessor to an OTLP/HTTP (protobuf) exporter, which reads the standard `OTEL_*`
variables itself (endpoint, headers, timeout, `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`).

The request's span is a small middleware rather than opentelemetry-instrumentation-django (a
beta that patches Django at start-up and brings four more packages): one span per request, the
route as its name, a `traceparent` from the caller continued, is all it has to do.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from core.redaction import redact

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

logger = logging.getLogger(__name__)

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def tracing_setup() -> None:
    """Start the SDK when settings say so (every process: web, worker, commands). Idempotent."""
    from django.conf import settings

    if not settings.TRACING_ENABLED or _provider is not None:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": settings.TRACING_SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    # Global too, so any other OpenTelemetry instrumentation a deployment adds joins the trace.
    trace.set_tracer_provider(provider)
    tracing_install(provider)
    logger.info("tracing on: OTLP/HTTP spans as service %s", settings.TRACING_SERVICE_NAME)


def tracing_install(provider: TracerProvider | None) -> None:
    """Use `provider` for this process's spans (None: tracing off). The tests install their own."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer("secondbrain") if provider is not None else None


def tracer() -> trace.Tracer | None:
    return _tracer


def tracing_flush(timeout_millis: int = 5000) -> None:
    """Export the spans still queued (a worker calls it when it stops)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def trace_carrier() -> dict[str, str] | None:
    """The current trace context as a carrier to store with a deferred job, or None (tracing
    off, or no span: a command, a periodic defer)."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextlib.contextmanager
def job_span(name: str, *, carrier: Mapping[str, str] | None, attributes: dict[str, Any]) -> Iterator[trace.Span]:
    """A job attempt's span, the child of the span that deferred it, or the root of its own
    trace when there was none. The caller sets its status (a postponement is no error)."""
    assert _tracer is not None
    parent = propagate.extract(carrier) if carrier else otel_context.Context()
    with _tracer.start_as_current_span(
        name,
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


@contextlib.contextmanager
def provider_span(name: str, **attributes: Any) -> Iterator[trace.Span | None]:
    """A client span around one call to an outside provider; an exception marks it failed."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(
        name, kind=trace.SpanKind.CLIENT, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except Exception as exc:
            span_failed(span, exc)
            raise


def span_failed(span: trace.Span, exc: BaseException) -> None:
    """Mark `span` failed by `exc`, its text redacted as the job's stored error is: a provider's
    reply may quote an address or a secret."""
    stacktrace = "".join(traceback.format_exception(exc))
    message = redact(str(exc))[:2000]
    span.record_exception(exc, attributes={"exception.message": message, "exception.stacktrace": redact(stacktrace)})
    span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {message}"[:200])


class TracingMiddleware:
    """The request's span (first in MIDDLEWARE, so it covers the others); it continues a trace
    the caller sent (`traceparent`). A None check per request when tracing is off."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        if _tracer is None:
            return self.get_response(request)
        headers = {key.lower(): value for key, value in request.headers.items()}
        with _tracer.start_as_current_span(
            request.method,
            context=propagate.extract(headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path},
        ) as span:
            response = self.get_response(request)
            match = getattr(request, "resolver_match", None)
            if match is not None and match.route:
                route = "/" + match.route.replace("^", "").replace("$", "")  # a router's regex paths
                span.update_name(f"{request.method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(trace.StatusCode.ERROR)
            return response
