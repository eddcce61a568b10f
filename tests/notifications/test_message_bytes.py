"""The message an e-mail sends on the SMTP backend: built by Django once per subject, body and
sender, with each e-mail's own headers in front (notifications/mail.py). It must read exactly as
the message Django builds whole, and anything the shortcut does not cover goes through Django."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
from django.core import mail as django_mail
from django.test import override_settings

from notifications import mail


class _Recorder:
    """Stands in for the SMTP session: records what sendmail was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], bytes]] = []

    def sendmail(self, envelope_from, recipients, data):
        self.sent.append((envelope_from, recipients, data))


class _Backend:
    supports_commit_point = True

    def __init__(self) -> None:
        self.connection = _Recorder()


def _django_whole(to, subject, body, headers) -> bytes:
    message = django_mail.EmailMessage(subject=subject, body=body, to=[to], headers=headers).message()
    return message.as_bytes(linesep="\r\n")  # as Django's SMTP backend sends it


def _parsed(data: bytes):
    return message_from_bytes(data, policy=policy.default)


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("News", "Hello"),
        ("Grüße aus Köln, a subject long enough to be folded over more than one line of the header", "Ça va ?\n.\nBye"),
        ("Plain", "x" * 5000),
    ],
)
def test_the_bytes_read_as_the_message_django_builds(subject, body):
    headers = {"Message-ID": "<1.2@secondbrain.localhost>", "X-Secondbrain-Notification": "42"}
    backend = _Backend()
    mail._sender(backend, to="rita@example.com", subject=subject, body=body, headers=headers)(backend)
    [(envelope_from, recipients, data)] = backend.connection.sent
    assert recipients == ["rita@example.com"] and "@" in envelope_from
    ours, django = _parsed(data), _parsed(_django_whole("rita@example.com", subject, body, headers))
    assert sorted(ours.keys()) == sorted(django.keys())  # the same headers, once each
    for name in django:
        if name != "Date":
            assert ours[name] == django[name], name
    assert ours["Date"]  # this e-mail's own
    assert ours.get_content() == django.get_content()
    assert ours.get_content().replace("\r\n", "\n") == body
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF line ends only


def test_the_template_is_built_once_for_many_emails():
    mail._template.cache_clear()
    backend = _Backend()
    for n in range(20):
        headers = {"Message-ID": f"<{n}@secondbrain.localhost>", "X-Secondbrain-Notification": str(n)}
        mail._sender(backend, to=f"r{n}@example.com", subject="Bulk", body="Hi", headers=headers)(backend)
    assert mail._template.cache_info().misses == 1
    tos = [_parsed(data)["To"] for _, _, data in backend.connection.sent]
    assert tos == [f"r{n}@example.com" for n in range(20)]


@pytest.mark.parametrize(
    ("to", "headers"),
    [
        ("Rita <rita@example.com>", {}),  # a name: Django formats it
        ("rita@exämple.com", {}),  # beyond ASCII
        ("rita@example.com", {"X-Note": "Grüße"}),  # a header to encode
        ("rita@example.com", {"X-Note": "line\r\nBcc: evil@example.com"}),  # a header injection
    ],
)
def test_anything_else_goes_through_django(to, headers, monkeypatch):
    sent = []
    monkeypatch.setattr(django_mail.EmailMessage, "send", lambda message, fail_silently=False: sent.append(message))
    backend = _Backend()
    mail._sender(backend, to=to, subject="S", body="B", headers={"Message-ID": "<1@x>", **headers})(backend)
    assert backend.connection.sent == [] and len(sent) == 1 and sent[0].to == [to]


@override_settings(EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend")
def test_a_backend_without_the_commit_point_gets_djangos_message():
    backend = django_mail.get_connection()
    mail._sender(backend, to="rita@example.com", subject="S", body="B", headers={"Message-ID": "<1@x>"})(backend)
    [message] = django_mail.outbox
    assert message.to == ["rita@example.com"] and message.extra_headers["Message-ID"] == "<1@x>"
