"""E-mail delivery through Django's e-mail framework, with exactly-once sends over SMTP.

The trick: an SMTP server keeps a message only once it has read the final "." of DATA. We
commit "sent" in PostgreSQL just before writing that dot. A worker killed before the commit
leaves a half-written message the server throws away (and the row still pending, so a re-run
sends it once); killed after it, the row already says "sent", so a re-run sends nothing.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core import mail
from django.core.mail.backends.smtp import EmailBackend

from core.errors import ProviderError

_state = threading.local()
SMTP_IDLE_SECONDS = 30.0  # well under the 5 minutes after which servers drop an idle session


class SendAborted(Exception):
    """The commit point refused (the job was cancelled or claimed by another run)."""


class _CommitBeforeDotMixin:
    def data(self, msg):
        callback = getattr(_state, "before_final_dot", None)
        if callback is None or not isinstance(msg, bytes):
            reply = super().data(msg)
            _state.reply = reply
            return reply
        self.putcmd("data")
        code, repl = self.getreply()
        if code != 354:
            raise smtplib.SMTPDataError(code, repl)
        body = re.sub(rb"(?m)^\.", b"..", msg)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        self.send(body)
        try:
            # The commit point may hand back the end of its own work (reading its COMMIT's
            # answer), done once the dot is out, so the two leave back to back.
            finish = callback()
        except BaseException:
            self.close()  # no final dot: the server discards the message
            raise
        _state.commit_point_passed = True
        try:
            self.send(b".\r\n")
        except BaseException:
            # The dot did not leave (the server reset the session): the server discards the
            # message. The COMMIT's answer is still read, or the database connection stays busy
            # with it and its next statement fails; the caller puts the row back for a retry.
            if finish is not None:
                finish()
            self.close()
            raise
        _state.committed = True
        if finish is not None:
            finish()
        reply = self.getreply()
        _state.reply = reply
        return reply


class _NoDelayMixin:
    def _get_socket(self, host, port, timeout):
        # The end of DATA is two writes in a row (the message, then the dot after the commit):
        # without TCP_NODELAY, Nagle's algorithm holds the dot back until the message is
        # acknowledged, which costs tens of milliseconds per e-mail.
        sock = super()._get_socket(host, port, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class _SMTP(_CommitBeforeDotMixin, _NoDelayMixin, smtplib.SMTP):
    pass


class _SMTP_SSL(_CommitBeforeDotMixin, _NoDelayMixin, smtplib.SMTP_SSL):
    pass


class ExactlyOnceSMTPBackend(EmailBackend):
    """Django's SMTP backend, with a commit point before the end of DATA."""

    supports_commit_point = True

    @property
    def connection_class(self):
        return _SMTP_SSL if self.use_ssl else _SMTP


@dataclass(frozen=True)
class SendResult:
    response: str  # the server's final reply, or what happened after the end of data


def _smtp_code(exc: BaseException) -> int | None:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return max(codes) if codes else None
    return getattr(exc, "smtp_code", None)


def _is_permanent(exc: BaseException) -> bool:
    code = _smtp_code(exc)
    return code is not None and 500 <= code < 600


def dot_sent() -> bool:
    """Whether this thread's last send wrote the final dot (the server then keeps the message)."""
    return bool(getattr(_state, "committed", False))


def _connection() -> tuple[Any, bool]:
    """This thread's open connection to the mail server, and whether it was used before.

    Each worker thread keeps one SMTP session open between e-mails (no TCP connect, EHLO, TLS
    and QUIT per message); one idle for SMTP_IDLE_SECONDS, or opened for other settings, is
    closed and opened afresh."""
    connection = getattr(_state, "connection", None)
    now = time.monotonic()
    target = (settings.EMAIL_BACKEND, settings.EMAIL_HOST, settings.EMAIL_PORT)
    if connection is not None and (now - _state.used_at > SMTP_IDLE_SECONDS or _state.target != target):
        _drop_connection()
        connection = None
    reused = connection is not None
    if connection is None:
        connection = mail.get_connection(fail_silently=False)
        connection.open()
        _state.connection = connection
        _state.target = target
    _state.used_at = now
    return connection, reused


def _drop_connection() -> None:
    connection = getattr(_state, "connection", None)
    _state.connection = None
    if connection is not None:
        with contextlib.suppress(Exception):  # a broken connection is being thrown away anyway
            connection.close()


class EmailSender:
    """One `send()`; raises core.errors.ProviderError carrying `permanent`."""

    def send(
        self,
        *,
        to: str,
        subject: str,
        body: str,
        message_id: str,
        headers: dict[str, str],
        commit_point: Callable[[], Callable[[], None] | None],
    ) -> SendResult:
        _state.committed = False
        _state.commit_point_passed = False
        _state.reply = None
        uses_commit_point = False
        try:
            connection, reused = _connection()
            message = mail.EmailMessage(
                subject=subject,
                body=body,
                to=[to],
                headers={"Message-ID": message_id, **headers},
                connection=connection,
            )
            uses_commit_point = getattr(connection, "supports_commit_point", False)
            _state.before_final_dot = commit_point if uses_commit_point else None
            try:
                message.send()
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                _drop_connection()
                if not reused or _state.commit_point_passed:
                    raise
                # The kept connection had died (the server closed it, or restarted) before
                # this message's final dot: the server kept nothing. Send on a fresh one.
                connection, _ = _connection()
                message.connection = connection
                message.send()
        except SendAborted:
            _drop_connection()
            raise
        except (TimeoutError, smtplib.SMTPException, OSError) as exc:
            _drop_connection()
            server_answered = _smtp_code(exc) is not None
            if _state.committed and not server_answered:
                # The dot went out and the connection died before the reply: the server
                # probably kept it. Re-sending could duplicate, so it counts as sent.
                return SendResult(response=f"no reply after end of data ({type(exc).__name__}); counted as sent")
            code = _smtp_code(exc)
            permanent = _is_permanent(exc)
            detail = f"SMTP {code}: {_reply_text(exc)}" if code else f"{type(exc).__name__}: {exc}".strip()
            summary = f"SMTP {code} ({'permanent' if permanent else 'transient'})" if code else type(exc).__name__
            # `from None`: the smtplib exception (with the server's reply) stays out of tracebacks.
            raise ProviderError(summary, permanent=permanent, detail=detail) from None
        except BaseException:
            _drop_connection()  # e.g. the commit point's database went away: the session is mid-reply
            raise
        finally:
            _state.before_final_dot = None
        if not uses_commit_point:  # a backend without DATA (files, console): commit after the send
            finish = commit_point()
            if finish is not None:
                finish()
        reply = _state.reply
        response = f"{reply[0]} {reply[1].decode(errors='replace')}" if reply else "accepted"
        return SendResult(response=response)


def _reply_text(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{r}: {m.decode(errors='replace')}" for r, (_, m) in exc.recipients.items())
    error = getattr(exc, "smtp_error", b"")
    return error.decode(errors="replace") if isinstance(error, bytes) else str(error)
