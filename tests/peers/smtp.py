"""A real SMTP server on 127.0.0.1 (aiosmtpd) that records what it receives.

Tests script its replies to DATA (e.g. "451 4.3.0 try later", "550 5.1.1 no such user"), can
stop it, so that connections are refused, and start it again on the same port, and can reset
every open session at once (`drop_connections`), e.g. while a sender waits before its final dot.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import deque
from email import message_from_bytes, policy
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _TrackedSMTP(SMTP):
    """aiosmtpd's session, remembered by the sink while it is open."""

    def __init__(self, sink: SmtpSink, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sink._transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink._transports.discard(self.transport)
        super().connection_lost(exc)


class _Controller(Controller):
    def __init__(self, sink: SmtpSink, **kwargs) -> None:
        super().__init__(sink, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        return _TrackedSMTP(self._sink, self.handler, **self.SMTP_kwargs)


class SmtpSink:
    def __init__(self) -> None:
        self.port = _free_port()
        self.messages: list[EmailMessage] = []
        self.received_at: list[float] = []
        self._replies: deque[str] = deque()
        self._lock = threading.Lock()
        self._controller: Controller | None = None
        self.rcpt_delay = 0.0  # seconds to stall after RCPT TO, to catch a sender mid-transaction
        self._transports: set[asyncio.BaseTransport] = set()

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
        self._controller = _Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until start() again."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def drop_connections(self) -> int:
        """Reset every open session (a TCP RST, as a crashing server or a middlebox sends): the
        client's next write fails. A message not finished by its dot is discarded. Returns how
        many sessions were dropped."""
        assert self._controller is not None
        done = threading.Event()
        dropped: list[int] = []

        def drop() -> None:
            for transport in list(self._transports):
                sock = transport.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            dropped.append(len(self._transports))
            self._transports.clear()
            # abort() closes the sockets in the loop's next round: return once they are closed
            # (the RST sent), or the client may write its next command before the reset.
            self._controller.loop.call_soon(done.set)

        self._controller.loop.call_soon_threadsafe(drop)
        done.wait(5)
        return dropped[0] if dropped else 0

    def reply_to_data(self, reply: str, times: int = 1) -> None:
        for _ in range(times):
            self._replies.append(reply)

    def notification_ids(self) -> list[str]:
        return [m["X-Secondbrain-Notification"] for m in self.messages]
