"""E-mail delivery, exactly once: the whole protocol in one object, `ExactlyOnceEmail`.

An SMTP server keeps a message only once it has read the final "." of DATA. So the row is
marked `sent` in a transaction whose COMMIT leaves for PostgreSQL just before the dot leaves
for the mail server, the two writes back to back:

- killed before the COMMIT left, the transaction rolls back and no dot follows: the server
  discards the half-written message and a re-run sends it once;
- killed after the dot left, the row already says `sent`: a re-run sends nothing;
- killed between the two writes (two system calls, a few microseconds: no other thread of the
  process runs in between, see `_commit_then_dot`), the e-mail is lost rather than sent twice.

When the COMMIT's answer never comes (the database went away once the dot had left), the send
is recorded as soon as the database answers, however long that takes, and never repeated.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import select
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import psycopg
from django.conf import settings
from django.core import mail
from django.core.mail.backends.smtp import EmailBackend
from django.core.mail.message import sanitize_address
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction

from core.errors import ProviderError
from core.tracing import provider_span
from notifications.models import DeliveryLog, NotificationJob

logger = logging.getLogger(__name__)

SMTP_IDLE_SECONDS = 30.0  # well under the 5 minutes after which servers drop an idle session


class SendAborted(Exception):
    """The commit point refused (the job was cancelled or claimed by another run)."""


class CommitPointStalled(ProviderError):
    """The commit point stalled (its process was stopped, its host froze) for so long that the
    server may have ended its session: its COMMIT would be lost, so no dot follows."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the commit point stalled for {seconds:.1f} s; not sending the final dot", permanent=False)


@dataclass(frozen=True)
class SendResult:
    response: str  # the server's final reply, or what happened after the end of data
    logged: bool = False  # the delivery log is written already (a send recorded after an outage)


# --- SQL of the commit point and of a send recorded late ------------------------------------
# The commit point commits durably whatever the role's or the database's default: a COMMIT
# acknowledged but not yet flushed (synchronous_commit = off) is lost in a crash, and its re-run
# would send the e-mail a second time.
_DURABLE = "SET LOCAL synchronous_commit = on"
# The commit point's UPDATE sets it itself (set_config(..., true) is SET LOCAL): one round trip
# less on every e-mail.
_MARK_SENT = """
WITH durable AS (SELECT set_config('synchronous_commit', 'on', true))
UPDATE notification_jobs SET status = 'sent', processed_at = now(), error = ''
  FROM durable
 WHERE id = %s AND provider_message_id = %s AND status = 'processing'
"""
_RECORD_SENT = """
UPDATE notification_jobs SET status = 'sent', processed_at = coalesce(processed_at, now()), error = ''
 WHERE id = %s AND provider_message_id = %s AND status IN ('processing', 'sent')
"""
_RECORD_RETRY_SECONDS = 0.2
_LOG = """
INSERT INTO notification_delivery_logs
       (notification_id, attempt, outcome, error, provider_response, duration_ms, created_at)
VALUES (%s, %s, %s, %s, %s, %s, now())
"""


def delivery_log_write(
    notification_id: int, attempt: int, outcome: str, *, error: str = "", response: str = "", started=None
) -> None:
    """One delivery log row (`started`: the perf_counter() the attempt began at)."""
    duration = (time.perf_counter() - started) * 1000 if started else 0
    with connection.cursor() as cursor:
        cursor.execute(_LOG, [notification_id, attempt, outcome, error[:2000], response[:2000], duration])


class ExactlyOnceEmail:
    """One claimed notification's e-mail, sent at most once.

    `message_id` is the claim's token: only the run holding it may mark the row sent. Its
    state (where the send stands) is its own; the SMTP connection calls `end_of_data` when the
    message's body has left and only the dot remains."""

    def __init__(self, *, notification_id: int, message_id: str, attempt: int) -> None:
        self.notification_id = notification_id
        self.message_id = message_id
        self.attempt = attempt
        self.passed_commit_point = False  # the COMMIT left: the row says sent once it commits
        self.dot_left = False  # the server keeps the message
        self.reply: tuple[int, bytes] | None = None

    # --- the send ---------------------------------------------------------------------------
    def send(self, *, to: str, subject: str, body: str, headers: dict[str, str]) -> SendResult:
        """Raises SendAborted (the claim was lost), or core.errors.ProviderError carrying
        `permanent` when the mail server fails."""
        # A span of the job's trace when tracing is on (core/tracing.py): no address, no text.
        attributes = {"server.address": settings.EMAIL_HOST, "server.port": settings.EMAIL_PORT}
        attributes |= {"notification.id": self.notification_id, "notification.attempt": self.attempt}
        with provider_span("smtp send", **attributes):
            return self._send(to=to, subject=subject, body=body, headers=headers)

    def _send(self, *, to: str, subject: str, body: str, headers: dict[str, str]) -> SendResult:
        try:
            committed_before = self._send_message(to=to, subject=subject, body=body, headers=headers)
        except SendAborted:
            _connections.drop()
            raise
        except (psycopg.Error, DatabaseError):
            _connections.drop()
            if not self.dot_left:
                raise
            # The dot went out but the COMMIT's answer never came (the database went away, or
            # lost the COMMIT in a crash or a failover): the e-mail is sent. Record it once the
            # database answers, however long that takes; nothing raises, so nothing re-sends.
            return self._record_when_back()
        except (TimeoutError, smtplib.SMTPException, OSError) as exc:
            _connections.drop()
            if self.dot_left and _smtp_code(exc) is None:
                # The dot went out and the connection died before the reply: the server
                # probably kept it. Re-sending could duplicate, so it counts as sent.
                return SendResult(response=f"no reply after end of data ({type(exc).__name__}); counted as sent")
            raise _provider_error(exc) from None  # the smtplib error (with the server's reply) stays out of tracebacks
        except BaseException:
            _connections.drop()  # e.g. the commit point's database went away: the session is mid-reply
            raise
        if not committed_before:  # a backend without DATA (files, console): commit after the send
            self._mark_sent()
            self._commit_then_dot(None)
            self._read_commit()
        reply = self.reply
        return SendResult(response=f"{reply[0]} {reply[1].decode(errors='replace')}" if reply else "accepted")

    def _send_message(self, *, to: str, subject: str, body: str, headers: dict[str, str]) -> bool:
        """Hand the message to Django's e-mail backend; True when the commit point ran in it."""
        backend, reused = _connections.get()
        headers = {"Message-ID": self.message_id, **headers}
        send = _sender(backend, to=to, subject=subject, body=body, headers=headers)
        with _connections.sending(backend, self):
            try:
                send(backend)
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                _connections.drop()
                if not reused or self.passed_commit_point:
                    raise
                # The kept connection had died (the server closed it, or restarted) before this
                # message's final dot: the server kept nothing. Send on a fresh one.
                backend, _ = _connections.get()
                with _connections.sending(backend, self):
                    send(backend)
        return getattr(backend, "supports_commit_point", False)

    def end_of_data(self, smtp: smtplib.SMTP) -> tuple[int, bytes]:
        """Called by the SMTP connection once the message's body has left: the commit point, the
        dot, the COMMIT's answer and the server's reply, in that order."""
        try:
            self._mark_sent()
        except BaseException:
            smtp.close()  # no final dot: the server discards the message
            raise
        self.passed_commit_point = True
        try:
            self._commit_then_dot(smtp.sock)
        except (psycopg.Error, DatabaseError):
            smtp.close()  # the COMMIT did not leave, so neither did the dot
            _quietly_close_database()
            raise
        except BaseException:
            # The dot did not leave (the server reset the session): the server discards the
            # message. The COMMIT's answer is still read, or the database connection stays busy
            # with it and its next statement fails; the caller puts the row back for a retry.
            self._read_commit()
            smtp.close()
            raise
        self.dot_left = True
        self._read_commit()
        self.reply = smtp.getreply()
        return self.reply

    # --- the commit point ---------------------------------------------------------------------
    def _mark_sent(self) -> None:
        """Mark the row sent in a transaction left open, and queue its COMMIT in libpq's buffer
        (pipeline mode: nothing leaves yet). Raises SendAborted when the claim is lost."""
        started = time.monotonic()
        connection.set_autocommit(False)
        try:
            with connection.cursor() as cursor:
                cursor.execute(_MARK_SENT, [self.notification_id, self.message_id])
                if cursor.rowcount != 1:
                    raise SendAborted
            _check_session_alive(started=started)
        except BaseException:
            try:
                connection.rollback()
                connection.set_autocommit(True)
            except DatabaseError:
                connection.close()  # the session is gone: the next statement opens a fresh one
            raise
        pgconn = connection.connection.pgconn
        pgconn.enter_pipeline_mode()
        pgconn.send_query_params(b"COMMIT", None)  # may release the GIL: harmless, it is only buffered

    @staticmethod
    def _commit_then_dot(sock: socket.socket | None) -> None:
        """The COMMIT to PostgreSQL, then the final dot to the mail server, two system calls in a
        row. psycopg's C implementation holds the GIL through the flush, and the dot is written
        on a non-blocking socket, which writes at once without waiting for the socket first:
        so no other thread runs in between, and a kill can only land in the microseconds
        between the two calls. (A GIL handed over there costs a switch interval, 5 ms.)"""
        pgconn = connection.connection.pgconn
        if sock is None:
            pgconn.pipeline_sync()  # Sync, and the flush
            return
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            pgconn.pipeline_sync()
            try:
                sent = sock.send(b".\r\n")
            except (BlockingIOError, ssl.SSLWantWriteError):
                sent = 0  # the socket's buffer is full: write the dot waiting, below
        finally:
            sock.settimeout(timeout)
        if sent < 3:
            sock.sendall(b".\r\n"[sent:])

    @staticmethod
    def _read_commit() -> None:
        """Read the commit point's answer and leave the session as Django expects it (idle, in
        autocommit). Raises psycopg.OperationalError when the COMMIT failed or the session was lost."""
        pgconn = connection.connection.pgconn
        try:
            error = _pipeline_results(pgconn)
            pgconn.exit_pipeline_mode()
            connection.set_autocommit(True)
        except BaseException:
            _quietly_close_database()
            raise
        if error:
            raise psycopg.OperationalError(f"COMMIT failed: {error}")

    # --- a send whose COMMIT's answer was lost -------------------------------------------------
    def _record_when_back(self) -> SendResult:
        """The job waits NOTIFICATIONS_OUTCOME_WAIT_SECONDS for the database; then the process's
        recorder thread takes over and keeps trying until the database answers."""
        deadline = time.monotonic() + settings.NOTIFICATIONS_OUTCOME_WAIT_SECONDS
        while not self.record_sent():
            if time.monotonic() > deadline:
                _recorder.add(self)
                return SendResult(response="sent; recorded once the database answers", logged=True)
            time.sleep(_RECORD_RETRY_SECONDS)
        return SendResult(response="sent; recorded after a database outage", logged=True)

    def record_sent(self) -> bool:
        """One attempt; True once the database has the outcome (False: it is still away)."""
        connection.close()  # a session that lost its server, or that was left mid-transaction
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute(_DURABLE)
                    cursor.execute(_RECORD_SENT, [self.notification_id, self.message_id])
                    recorded = cursor.rowcount == 1
                if recorded:
                    response = "sent; recorded after a database outage"
                else:
                    # Another run claimed it meanwhile (it was rescued): it may have gone twice.
                    response = "sent; recorded after a database outage, but another run had claimed it since"
                    logger.error("Notification %s: %s (Message-ID %s)", self.notification_id, response, self.message_id)
                if NotificationJob.objects.filter(id=self.notification_id).exists():
                    delivery_log_write(self.notification_id, self.attempt, DeliveryLog.Outcome.SENT, response=response)
        except (OperationalError, InterfaceError):  # the database is still away
            connection.close()
            return False
        except DatabaseError:
            # Not an outage (a bug, a schema change): retrying would never end.
            logger.exception("Notification %s: sent, but the send could not be recorded", self.notification_id)
        return True


# --- The message's bytes ----------------------------------------------------------------------
# Building a MIME message and parsing its addresses (Django's EmailMessage, the e-mail package)
# was a quarter of a worker's CPU per e-mail. The e-mails of a bulk send share their subject, body
# and sender, so on the SMTP backend the message is built by Django once per (subject, body,
# sender) without the headers that differ from one e-mail to the next, and each e-mail puts
# those in front: `To` (a plain address), `Date`, `Message-ID` and the caller's own. Anything
# else (an address with a name or beyond ASCII, a header that would need encoding or folding, a
# backend without the commit point) goes the whole way through Django, as before.
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_PLAIN_VALUE = re.compile(r"[\x20-\x7e]{0,900}")  # printable ASCII that fits one header line
_TEMPLATES = 64  # distinct (subject, body, sender) kept per process; a body is at most 100 kB


def _sender(backend: Any, *, to: str, subject: str, body: str, headers: dict[str, str]):
    """How to send this message on `backend`: a function of the backend (the one to send on)."""
    plain = _PLAIN_ADDRESS.fullmatch(to) and all(
        _PLAIN_VALUE.fullmatch(value) and name.isascii() and name.replace("-", "").isalnum()
        for name, value in headers.items()
    )
    if not (plain and getattr(backend, "supports_commit_point", False)):
        message = mail.EmailMessage(subject=subject, body=body, to=[to], headers=headers)

        def send_with_django(backend: Any) -> None:
            message.connection = backend
            message.send()

        return send_with_django
    from_email = settings.DEFAULT_FROM_EMAIL
    varying = {"To": to, "Date": formatdate(localtime=settings.EMAIL_USE_LOCALTIME), **headers}
    data = "".join(f"{name}: {value}\r\n" for name, value in varying.items()).encode() + _template(
        subject, body, from_email
    )
    envelope_from = _envelope_address(from_email)

    def send_the_bytes(backend: Any) -> None:
        backend.connection.sendmail(envelope_from, [to], data)

    return send_the_bytes


@functools.lru_cache(maxsize=_TEMPLATES)
def _template(subject: str, body: str, from_email: str) -> bytes:
    """The message as Django writes it, less To, Date and Message-ID: its other headers, the
    blank line and the encoded body, with CRLF line ends."""
    headers = {"Date": "", "Message-ID": ""}  # not generated: each e-mail has its own
    mime = mail.EmailMessage(subject=subject, body=body, from_email=from_email, headers=headers).message()
    del mime["Date"], mime["Message-ID"]
    return mime.as_bytes(linesep="\r\n")


@functools.lru_cache(maxsize=8)
def _envelope_address(address: str) -> str:
    return sanitize_address(address, settings.DEFAULT_CHARSET)


def _check_session_alive(*, started: float) -> None:
    """Call after the commit point's UPDATE, before its COMMIT. A session idle in its transaction
    for DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS is ended by the server, which frees the row
    for a rescue; a COMMIT written into it afterwards is lost while the dot still reaches the mail
    server. So a commit point that took half that long, or whose server has hung up, stops here."""
    elapsed = time.monotonic() - started
    limit = settings.DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS / 2
    if limit and elapsed > limit:
        raise CommitPointStalled(elapsed)
    pgconn = connection.connection.pgconn
    pgconn.consume_input()  # raises when the server has closed the session
    if pgconn.status != psycopg.pq.ConnStatus.OK:
        raise CommitPointStalled(elapsed)


def _pipeline_results(pgconn: psycopg.pq.abc.PGconn) -> str:
    """Collect the results of a pipeline up to its Sync (libpq's own calls, waiting on the
    socket for as long as it takes); the first error's message, or "" when all went well."""
    error = ""
    while True:
        pgconn.consume_input()  # raises psycopg.OperationalError when the session is lost
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            continue  # the end of one statement's results
        if result.status == psycopg.pq.ExecStatus.PIPELINE_SYNC:
            return error
        if result.status == psycopg.pq.ExecStatus.FATAL_ERROR and not error:
            error = (result.error_message or b"").decode(errors="replace").strip()


def _quietly_close_database() -> None:
    with contextlib.suppress(Exception):  # a broken session is being thrown away anyway
        connection.close()


# --- SMTP with the commit point -------------------------------------------------------------
class _EndOfDataMixin:
    """smtplib's SMTP whose DATA stops before the final dot and hands over to `exactly_once`."""

    exactly_once: ExactlyOnceEmail | None = None

    def connect(self, host="localhost", port=0, source_address=None):
        reply = super().connect(host, port, source_address)
        # The end of DATA is two writes in a row (the message, then the dot after the commit):
        # without TCP_NODELAY, Nagle's algorithm holds the dot back until the message is
        # acknowledged, which costs tens of milliseconds per e-mail.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reply

    def data(self, msg):
        if self.exactly_once is None or not isinstance(msg, bytes):
            return super().data(msg)
        self.putcmd("data")
        code, repl = self.getreply()
        if code != 354:
            raise smtplib.SMTPDataError(code, repl)
        body = re.sub(rb"(?m)^\.", b"..", msg)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        self.send(body)
        return self.exactly_once.end_of_data(self)


class _SMTP(_EndOfDataMixin, smtplib.SMTP):
    pass


class _SMTP_SSL(_EndOfDataMixin, smtplib.SMTP_SSL):
    pass


class ExactlyOnceSMTPBackend(EmailBackend):
    """Django's SMTP backend, with a commit point before the end of DATA."""

    supports_commit_point = True

    @property
    def connection_class(self):
        return _SMTP_SSL if self.use_ssl else _SMTP


class _Connections(threading.local):
    """Each worker thread keeps one SMTP session open between e-mails (no TCP connect, EHLO,
    TLS and QUIT per message); one idle for SMTP_IDLE_SECONDS, or opened for other settings, is
    closed and opened afresh."""

    backend: Any = None
    used_at = 0.0
    target: tuple = ()

    def get(self) -> tuple[Any, bool]:
        """This thread's open backend, and whether it was used before."""
        now = time.monotonic()
        target = (settings.EMAIL_BACKEND, settings.EMAIL_HOST, settings.EMAIL_PORT)
        if self.backend is not None and (now - self.used_at > SMTP_IDLE_SECONDS or self.target != target):
            self.drop()
        reused = self.backend is not None
        if self.backend is None:
            backend = mail.get_connection(fail_silently=False)
            backend.open()
            self.backend, self.target = backend, target
        self.used_at = now
        return self.backend, reused

    def drop(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            with contextlib.suppress(Exception):  # a broken connection is being thrown away anyway
                backend.close()

    @staticmethod
    @contextlib.contextmanager
    def sending(backend: Any, email: ExactlyOnceEmail):
        smtp = getattr(backend, "connection", None)
        if not isinstance(smtp, _EndOfDataMixin):
            yield
            return
        smtp.exactly_once = email
        try:
            yield
        finally:
            smtp.exactly_once = None


_connections = _Connections()


# --- errors -----------------------------------------------------------------------------------
def _smtp_code(exc: BaseException) -> int | None:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return max(codes) if codes else None
    return getattr(exc, "smtp_code", None)


def _provider_error(exc: BaseException) -> ProviderError:
    code = _smtp_code(exc)
    permanent = code is not None and 500 <= code < 600
    detail = f"SMTP {code}: {_reply_text(exc)}" if code else f"{type(exc).__name__}: {exc}".strip()
    summary = f"SMTP {code} ({'permanent' if permanent else 'transient'})" if code else type(exc).__name__
    return ProviderError(summary, permanent=permanent, detail=detail)


def _reply_text(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{r}: {m.decode(errors='replace')}" for r, (_, m) in exc.recipients.items())
    error = getattr(exc, "smtp_error", b"")
    return error.decode(errors="replace") if isinstance(error, bytes) else str(error)


# --- sends whose outcome only this process knows -----------------------------------------------
class _OutcomeRecorder:
    """Sends whose outcome a job could not record in time, recorded by one thread of the process
    as soon as the database answers. Not a daemon: a stopping worker waits for it, so what only
    this process knows (the dot left) is not lost with it."""

    LOG_EVERY_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[ExactlyOnceEmail] = []
        self._thread: threading.Thread | None = None

    def add(self, email: ExactlyOnceEmail) -> None:
        with self._lock:
            self._pending.append(email)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="notification-outcomes")
                self._thread.start()
        logger.warning("Notification %s: sent, recorded once the database answers", email.notification_id)

    def _run(self) -> None:
        logged_at = time.monotonic()
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    connection.close()  # this thread's own
                    return
                email = self._pending[0]
            if email.record_sent():
                with self._lock:
                    self._pending.remove(email)
                continue
            if time.monotonic() - logged_at > self.LOG_EVERY_SECONDS:
                logged_at = time.monotonic()
                ids = [pending.notification_id for pending in self._pending]
                logger.warning("Waiting for the database to record %d sent notification(s): %s", len(ids), ids)
            time.sleep(_RECORD_RETRY_SECONDS)


_recorder = _OutcomeRecorder()
