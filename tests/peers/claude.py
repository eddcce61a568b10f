"""A small HTTP server on 127.0.0.1 that speaks the Anthropic Messages API.

Tests script its answers (`answer_json`, `fail`, `answer_text`, `hang`) and read the requests
it received. The real `anthropic` SDK talks to it over HTTP: no Python mocks of the client.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class _Reply:
    status: int = 200
    text: str | None = None
    input_tokens: int = 100
    output_tokens: int = 50
    hang: threading.Event | None = None
    echo: bool = False  # an error whose message quotes the request, as some providers' do


@dataclass
class FakeClaude:
    host: str = "127.0.0.1"
    requests: list[dict[str, Any]] = field(default_factory=list)
    default: _Reply = field(
        default_factory=lambda: _Reply(
            text=json.dumps({"type": "note", "tags": [], "summary": "A note.", "connections": []})
        )
    )

    def __post_init__(self) -> None:
        self._script: deque[_Reply] = deque()
        self._lock = threading.Lock()
        self.request_started = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with fake._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    fake.requests.append({"path": self.path, "headers": headers, "body": body})
                    reply = fake._script.popleft() if fake._script else fake.default
                fake.request_started.set()
                if reply.hang is not None:
                    reply.hang.wait(60)
                if self.path != "/v1/messages":
                    reply = _Reply(status=404)
                if reply.status == 200:
                    payload = {
                        "id": f"msg_{len(fake.requests)}",
                        "type": "message",
                        "role": "assistant",
                        "model": body.get("model", "claude-haiku-4-5"),
                        "content": [{"type": "text", "text": reply.text or ""}],
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
                    }
                else:
                    message = f"scripted; could not process {json.dumps(body)}" if reply.echo else "scripted"
                    payload = {
                        "type": "error",
                        "error": {"type": _ERROR_TYPES.get(reply.status, "api_error"), "message": message},
                    }
                data = json.dumps(payload).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FakeClaude:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- scripting -------------------------------------------------------------------------
    def answer_json(self, data: dict, *, input_tokens: int = 100, output_tokens: int = 50) -> None:
        self.answer_text(json.dumps(data), input_tokens=input_tokens, output_tokens=output_tokens)

    def answer_text(self, text: str, *, input_tokens: int = 100, output_tokens: int = 50) -> None:
        self._script.append(_Reply(text=text, input_tokens=input_tokens, output_tokens=output_tokens))

    def fail(self, status: int, times: int = 1, *, echo: bool = False) -> None:
        for _ in range(times):
            self._script.append(_Reply(status=status, echo=echo))

    def hang(self, release: threading.Event, *, status: int = 200) -> None:
        """The next request blocks until `release` is set (a call in flight), then answers the
        default answer, or the error `status` (e.g. 529, overloaded)."""
        self._script.append(_Reply(status=status, text=self.default.text, hang=release))

    @property
    def message_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/v1/messages"]
