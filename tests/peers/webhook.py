"""A webhook receiver on 127.0.0.1: a tiny http.server in a thread that records every POST.

Tests script its answers (e.g. one 500 before the 200s, a redirect, an answer dripped one byte
a second, an endless body) and verify the signature the way a real receiver would.

`StaticResolver` stands in for DNS (the network edge): tests point `jobs.tasking.webhooks.webhook_resolve`
at it to make a name resolve to 127.0.0.1 without touching /etc/hosts or a name server.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class ReceivedPost:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


@dataclass
class Streamed:
    """What the receiver managed to write of a dripped or endless answer before the client left."""

    bytes_sent: int = 0
    finished: bool = False  # the whole answer went out: the client waited for all of it


class WebhookReceiver:
    """Answers each POST with the next of `statuses` (then 200), unless a mode is set:

    - `redirect_to`: 302 with that Location;
    - `drip_seconds`: a complete 200 answer, written one byte every `drip_seconds`;
    - `endless_body_bytes`: 200 without Content-Length and that many body bytes (think: endless).
    """

    def __init__(self, *, certfile: str | None = None, keyfile: str | None = None) -> None:
        self.posts: list[ReceivedPost] = []
        self.server_names: list[str | None] = []  # TLS SNI of each connection (https only)
        self.statuses: deque[int] = deque()  # answers to give, in order; then 200
        self.redirect_to: str | None = None
        self.drip_seconds: float | None = None
        self.endless_body_bytes: int | None = None
        self.streamed: list[Streamed] = []
        self.received = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.posts.append(ReceivedPost(self.path, dict(self.headers.items()), body))
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                receiver.received.set()
                self.close_connection = True
                if receiver.drip_seconds is not None:
                    answer = b"HTTP/1.0 200 OK\r\n\r\n"  # complete: the body ends when we close
                    self._stream([answer[i : i + 1] for i in range(len(answer))], pause=receiver.drip_seconds)
                elif receiver.endless_body_bytes is not None:
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                    chunk = b"x" * 65536
                    count = receiver.endless_body_bytes // len(chunk)
                    self._stream([head, *([chunk] * count)], pause=0)
                elif receiver.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", receiver.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def _stream(self, pieces: list[bytes], *, pause: float) -> None:
                streamed = Streamed()
                with receiver._lock:
                    receiver.streamed.append(streamed)
                try:
                    for piece in pieces:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        streamed.bytes_sent += len(piece)
                        if pause:
                            time.sleep(pause)
                except OSError:  # the client hung up: what we want to see
                    return
                streamed.finished = True

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.scheme = "http"
        if certfile is not None:  # https: the handshake happens as each connection is accepted
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile, keyfile)
            context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    def url(self, path: str = "/hook", *, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def self_signed_certificate(directory: str, host: str) -> tuple[str, str]:
    """A certificate for `host` and its key (files in `directory`), made with the openssl tool."""
    import subprocess

    certfile, keyfile = f"{directory}/cert.pem", f"{directory}/key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            keyfile,
            "-out",
            certfile,
            "-days",
            "1",
            "-subj",
            f"/CN={host}",
            "-addext",
            f"subjectAltName=DNS:{host}",
        ],
        check=True,
        capture_output=True,
    )
    return certfile, keyfile


@dataclass
class StaticResolver:
    """Host names to addresses; other names go to `fallback` (the system resolver)."""

    fallback: Callable[[str], list[str]] | None = None
    names: dict[str, list[str]] = field(default_factory=dict)

    def __call__(self, host: str) -> list[str]:
        if host in self.names:
            return list(self.names[host])
        if self.fallback is None:
            raise OSError(f"{host}: no such name")
        return self.fallback(host)
