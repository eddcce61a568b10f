"""A real SMTP server on 127.0.0.1 (aiosmtpd) that records what it receives.

Tests script its replies to DATA (e.g. "451 4.3.0 try later", "550 5.1.1 no such user") and
can stop it, so that connections are refused, and start it again on the same port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from email import message_from_bytes, policy
from email.message import EmailMessage

from aiosmtpd.controller import Controller


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SmtpSink:
    def __init__(self) -> None:
        self.port = _free_port()
        self.messages: list[EmailMessage] = []
        self.received_at: list[float] = []
        self._replies: deque[str] = deque()
        self._lock = threading.Lock()
        self._controller: Controller | None = None
        self.rcpt_delay = 0.0  # seconds to stall after RCPT TO, to catch a sender mid-transaction

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        with self._lock:
            if self._replies:
                return self._replies.popleft()
            message = message_from_bytes(envelope.content, policy=policy.default)
            message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
            self.messages.append(message)
            self.received_at.append(time.monotonic())
            return f"250 2.0.0 Ok: queued as {len(self.messages)}"

    def start(self) -> SmtpSink:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until start() again."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def reply_to_data(self, reply: str, times: int = 1) -> None:
        for _ in range(times):
            self._replies.append(reply)

    def notification_ids(self) -> list[str]:
        return [m["X-Secondbrain-Notification"] for m in self.messages]
