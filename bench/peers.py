"""A light SMTP sink for throughput runs: it counts what it receives and parses nothing, so the
measurement is of the sender, not of the sink's e-mail parser (the tests' sink parses every
message into an EmailMessage, which costs about a millisecond each)."""

from __future__ import annotations

import re
import socket
import threading
import time

from aiosmtpd.controller import Controller

_NOTIFICATION = re.compile(rb"^X-Secondbrain-Notification: *(\d+)", re.MULTILINE)


class CountingSmtpSink:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.received_at: list[float] = []
        self.notification_ids: list[int] = []
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope) -> str:
        found = _NOTIFICATION.search(envelope.content)
        with self._lock:
            self.received_at.append(time.monotonic())
            self.notification_ids.append(int(found.group(1)) if found else 0)
        return "250 2.0.0 Ok"

    def start(self) -> CountingSmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    @property
    def count(self) -> int:
        return len(self.received_at)
