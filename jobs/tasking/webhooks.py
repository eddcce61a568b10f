"""Completion webhooks: a job deferred with a `callback_url` is POSTed its final status and
result when it ends.

The database queues the delivery (the status trigger, migrations 0003 and 0006) in the same
transaction that ends the job, as a `jobs.webhook_deliver` job on the `webhooks` queue, which
then POSTs it, retried with backoff.

A callback URL makes the service open a connection that a client chose, so every rule below is
checked when the job is deferred (400 naming `callback_url`) and again before each POST:

- https (http only with `JOBS_WEBHOOK_ALLOW_HTTP`), on port 443 (80 for http) or one in
  `JOBS_WEBHOOK_ALLOWED_PORTS`, on a host in `JOBS_WEBHOOK_ALLOWED_HOSTS`;
- every address the name resolves to is public: loopback, private, link-local, shared,
  multicast and reserved ranges are refused unless `JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES` or a
  network in `JOBS_WEBHOOK_ALLOWED_NETWORKS` lets them in;
- the connection goes to the address that was checked (no second lookup a rebinding name could
  answer differently); the name only travels as Host and TLS SNI, and the certificate is checked
  against it. Redirects are not followed.

One delivery has `JOBS_WEBHOOK_TIMEOUT_SECONDS` in all (lookup, connect, TLS, request and
answer), not per socket operation, and reads at most `JOBS_WEBHOOK_MAX_RESPONSE_BYTES` of the
answer's body. Each POST carries `X-Secondbrain-Delivery`, `X-Secondbrain-Timestamp` and
`X-Secondbrain-Signature: sha256=<hex>`, the HMAC-SHA256 of "<timestamp>.<body>" under the job
owner's own secret (`WebhookSecret`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from rest_framework import status

from core.errors import ApplicationError, ProviderError
from core.tracing import provider_span

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CallbackTarget:
    """A callback URL taken apart, its rules checked except the addresses."""

    scheme: str
    host: str
    port: int
    path: str


class CallbackRefused(Exception):
    """A callback URL breaks a rule; the message says which, for the client."""


def webhook_resolve(host: str) -> list[str]:
    """The addresses `host` resolves to (the system resolver). Tests replace this function: DNS
    is the network edge."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _allowed_ports() -> set[int]:
    return {443, *([80] if settings.JOBS_WEBHOOK_ALLOW_HTTP else []), *settings.JOBS_WEBHOOK_ALLOWED_PORTS}


def _host_listed(host: str) -> bool:
    for allowed in settings.JOBS_WEBHOOK_ALLOWED_HOSTS:
        allowed = allowed.lower()
        if host == allowed or (allowed.startswith(".") and host.endswith(allowed)):
            return True
    return False


def webhook_target(url: str) -> CallbackTarget:
    """Scheme, host and port of `url` checked against the settings (no lookup). Raises CallbackRefused."""
    schemes = ("http", "https") if settings.JOBS_WEBHOOK_ALLOW_HTTP else ("https",)
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise CallbackRefused(
            "Must be an http or https URL with a host."
            if settings.JOBS_WEBHOOK_ALLOW_HTTP
            else "Must be an https URL with a host (plain http needs JOBS_WEBHOOK_ALLOW_HTTP)."
        )
    host = parts.hostname.lower()
    if not _host_listed(host):
        raise CallbackRefused("Its host is not in JOBS_WEBHOOK_ALLOWED_HOSTS.")
    try:
        port = parts.port
    except ValueError as exc:  # out of range, or not a number
        raise CallbackRefused("Its port is not a valid port number (1 to 65535).") from exc
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    allowed_ports = _allowed_ports()
    if port not in allowed_ports:
        listed = ", ".join(str(p) for p in sorted(allowed_ports))
        raise CallbackRefused(f"Its port must be one of {listed} (JOBS_WEBHOOK_ALLOWED_PORTS adds ports).")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return CallbackTarget(scheme=parts.scheme, host=host, port=port, path=path)


def _address_allowed(address: _IPAddress) -> bool:
    if settings.JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES:
        return True
    if any(
        address in ipaddress.ip_network(network, strict=False) for network in settings.JOBS_WEBHOOK_ALLOWED_NETWORKS
    ):
        return True
    # is_global excludes loopback, private, link-local, shared (100.64/10), documentation and
    # reserved ranges; multicast addresses can be "global" but are never a receiver.
    return address.is_global and not address.is_multicast


def _parse_address(text: str) -> _IPAddress:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone index is not part of it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def webhook_addresses(target: CallbackTarget, *, timeout: float) -> list[_IPAddress]:
    """The addresses to connect to for `target`, every one of them allowed.

    Raises CallbackRefused if any is not (a name with one private address among public ones is
    refused: which one a client gets is not ours to choose), OSError if the name does not resolve
    (within `timeout`)."""
    try:
        literal = _parse_address(target.host.strip("[]"))
    except ValueError:
        literal = None
    addresses = [literal] if literal is not None else [_parse_address(a) for a in _resolve(target.host, timeout)]
    if not addresses:
        raise OSError(f"{target.host} has no address")
    for address in addresses:
        if not _address_allowed(address):
            raise CallbackRefused(
                f"Its host resolves to {address}, which is not a public address"
                " (JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES or JOBS_WEBHOOK_ALLOWED_NETWORKS let such addresses in)."
            )
    return addresses


def _resolve(host: str, timeout: float) -> list[str]:
    """`webhook_resolve(host)`, given up after `timeout` (getaddrinfo has no timeout of its own;
    the lookup thread is left to finish on its own)."""
    outcome: dict[str, object] = {}

    def lookup() -> None:
        try:
            outcome["addresses"] = webhook_resolve(host)
        except Exception as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=lookup, name="webhook-resolve", daemon=True)
    thread.start()
    thread.join(max(timeout, 0))
    error = outcome.get("error")
    if isinstance(error, UnicodeError | ValueError):  # no IDNA form (a label over 63 characters), a NUL
        raise CallbackRefused("Its host is not a valid host name.") from error
    if error is not None:
        raise error  # type: ignore[misc]
    if "addresses" not in outcome:
        raise TimeoutError(f"resolving {host} passed the delivery deadline")
    return outcome["addresses"]  # type: ignore[return-value]


def webhook_url_problem(url: str) -> str | None:
    """Why `url` cannot be a callback URL, or None. A name that does not resolve now is accepted
    (DNS may be down for a moment); the delivery checks it again."""
    try:
        webhook_addresses(webhook_target(url), timeout=settings.JOBS_WEBHOOK_TIMEOUT_SECONDS)
    except CallbackRefused as refused:
        return str(refused)
    except OSError:
        return None
    return None


def webhook_callback_check(url: str, *, owner_id: int | None) -> None:
    """A job's or a batch's completion webhook: it needs an owner (whose secret signs the
    deliveries) and a URL that passes webhook_url_check."""
    if owner_id is None:
        raise ValueError("callback_url needs an owner_id: the owner's secret signs the deliveries")
    webhook_url_check(url)


def webhook_url_check(url: str) -> None:
    """Refuse (400, naming the field) a callback URL that breaks a rule."""
    problem = webhook_url_problem(url)
    if problem is not None:
        raise ApplicationError(
            "Invalid callback URL.", status_code=status.HTTP_400_BAD_REQUEST, extra={"callback_url": [problem]}
        )


def webhook_signature(*, body: bytes, timestamp: int, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the delivery passed its deadline (JOBS_WEBHOOK_TIMEOUT_SECONDS)")
        return left


class _DeadlineMixin:
    """Every blocking call gets what is left of the delivery's deadline as its timeout, so a peer
    that answers one byte at a time cannot stretch the delivery past it."""

    deadline: _Deadline

    def _arm(self) -> None:
        self.settimeout(self.deadline.remaining())  # type: ignore[attr-defined]

    def recv(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._arm()
        return super().recv(*args, **kwargs)  # type: ignore[misc]

    def recv_into(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._arm()
        return super().recv_into(*args, **kwargs)  # type: ignore[misc]

    def send(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._arm()
        return super().send(*args, **kwargs)  # type: ignore[misc]

    def sendall(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._arm()  # sendall's timeout is for the whole call
        return super().sendall(*args, **kwargs)  # type: ignore[misc]

    def do_handshake(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._arm()
        return super().do_handshake(*args, **kwargs)  # type: ignore[misc]


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to `addresses` (already checked), never to what `host` might resolve to now.
    `host` is sent as Host and SNI, and the certificate must be valid for it."""

    def __init__(self, target: CallbackTarget, addresses: list[_IPAddress], deadline: _Deadline) -> None:
        super().__init__(target.host, target.port)
        self._target = target
        self._addresses = addresses
        self._deadline = deadline
        if target.scheme == "https":
            self.default_port = 443  # Host without ":443"

    def connect(self) -> None:
        error: OSError | None = None
        for address in self._addresses:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = _DeadlineSocket(family, socket.SOCK_STREAM)
            sock.deadline = self._deadline
            try:
                sock.settimeout(self._deadline.remaining())
                sock.connect((str(address), self._target.port))
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self.sock = self._wrap(sock) if self._target.scheme == "https" else sock
            return
        raise error or OSError("no address to connect to")

    def _wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        tls = context.wrap_socket(sock, server_hostname=self._target.host, do_handshake_on_connect=False)
        tls.deadline = self._deadline  # type: ignore[attr-defined]
        tls.do_handshake()
        return tls


def webhook_post(*, url: str, payload: dict, secret: str, delivery_id: int) -> int:
    """POST `payload` signed with `secret`; returns the HTTP status. Raises ProviderError
    (permanent when the URL breaks a rule or the answer is final, transient otherwise)."""
    # A span of the job's trace when tracing is on (core/tracing.py): the host, not the URL's path.
    host = urlsplit(url).hostname or ""
    with provider_span("webhook POST", **{"server.address": host, "webhook.delivery_id": delivery_id}) as span:
        answer = _webhook_post(url=url, payload=payload, secret=secret, delivery_id=delivery_id)
        if span is not None:
            span.set_attribute("http.response.status_code", answer)
        return answer


def _webhook_post(*, url: str, payload: dict, secret: str, delivery_id: int) -> int:
    deadline = _Deadline(settings.JOBS_WEBHOOK_TIMEOUT_SECONDS)
    try:
        target = webhook_target(url)
        addresses = webhook_addresses(target, timeout=deadline.remaining())
    except CallbackRefused as refused:
        raise ProviderError(f"callback URL refused: {refused}", permanent=True) from refused
    except OSError as exc:  # no such name (yet), or the lookup passed the deadline
        raise ProviderError(f"callback host {urlsplit(url).hostname} did not resolve: {exc}", permanent=False) from exc
    body = json.dumps(payload, default=str).encode()
    timestamp = int(time.time())
    conn = _PinnedConnection(target, addresses, deadline)
    try:
        conn.request(
            "POST",
            target.path,
            body=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "secondbrain-webhooks",
                "Connection": "close",
                "X-Secondbrain-Delivery": str(delivery_id),
                "X-Secondbrain-Timestamp": str(timestamp),
                "X-Secondbrain-Signature": webhook_signature(body=body, timestamp=timestamp, secret=secret),
            },
        )
        response = conn.getresponse()
        # The status decides; the body is only drained, at most this much, within the deadline.
        with contextlib.suppress(OSError, http.client.HTTPException):
            response.read(settings.JOBS_WEBHOOK_MAX_RESPONSE_BYTES)
    except TimeoutError as exc:
        raise ProviderError(
            f"callback to {target.host} passed the delivery deadline"
            f" ({settings.JOBS_WEBHOOK_TIMEOUT_SECONDS:g} s, JOBS_WEBHOOK_TIMEOUT_SECONDS)",
            permanent=False,
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ProviderError(f"callback to {target.host} failed: {exc}", permanent=False) from exc
    finally:
        conn.close()
    if 200 <= response.status < 300:
        return response.status
    if 300 <= response.status < 400:
        raise ProviderError(f"callback answered HTTP {response.status} (redirects are not followed)", permanent=True)
    transient = response.status >= 500 or response.status in (408, 409, 425, 429)
    raise ProviderError(f"callback answered HTTP {response.status}", permanent=not transient)
