"""An OTLP/HTTP trace receiver on 127.0.0.1: what a collector does with `POST /v1/traces`.

It decodes each ExportTraceServiceRequest (protobuf, gzip or not) with the opentelemetry-proto
package and keeps the spans as plain records the tests read (`spans`, `span`, `wait_for_span`).
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a trace's root
    kind: str  # "SERVER", "CONSUMER", "CLIENT", ...
    attributes: dict[str, Any]
    failed: bool
    service: str
    exceptions: tuple[dict[str, Any], ...]  # the attributes of its "exception" events

    def is_child_of(self, other: ReceivedSpan) -> bool:
        return self.trace_id == other.trace_id and self.parent_span_id == other.span_id


def _value(any_value) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                receiver._keep(request)
                data = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT is set to (the exporter adds /v1/traces)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            failed=span.status.code == Status.STATUS_CODE_ERROR,
                            service=resource.get("service.name", ""),
                            exceptions=tuple(
                                {a.key: _value(a.value) for a in event.attributes}
                                for event in span.events
                                if event.name == "exception"
                            ),
                        )
                    )
        with self._lock:
            self.requests += 1
            self._spans.extend(received)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]

    def span(self, name: str) -> ReceivedSpan:
        [found] = self.named(name)
        return found

    def wait_for_span(self, name: str, *, timeout: float = 20.0) -> ReceivedSpan:
        """For another process's exporter, which sends on its own schedule."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.named(name):
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no span {name!r} in {timeout} s (got {[s.name for s in self.spans]})")
