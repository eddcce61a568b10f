"""send-email's optional `callback_url`: refused unless its host is allowed, its port too, and
what its name resolves to is a public address; when given, the job's final status is POSTed
there once the e-mail is delivered (a real HTTP peer on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.models import JobInfo
from jobs.tasking import webhooks
from jobs.tasking.webhooks import webhook_signature
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import client_for, jobs, run_worker
from tests.peers.webhook import StaticResolver


class WebhookPeer:
    """An HTTP server on 127.0.0.1 that records every POST."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/mail"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def allowed(settings):
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1", ".example.com"]


@pytest.fixture
def resolver(monkeypatch) -> StaticResolver:
    """DNS is the network edge: names the test adds, then the system's (`localhost` is real)."""
    static = StaticResolver(fallback=getattr(webhooks, "webhook_resolve", None))
    monkeypatch.setattr(webhooks, "webhook_resolve", static, raising=False)
    return static


def _send(api, recipient, **extra):
    payload = {"recipient_id": recipient.id, "subject": "Hello", "body": "Hi there", **extra}
    return api.post("/api/notifications/send-email/", payload, format="json")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # not an allowed host
        "http://example.com.evil.test/hook",
        "ftp://hooks.example.com/hook",  # not http(s)
        "not a url",
        "",
    ],
)
def test_a_callback_url_on_a_host_not_allowed_is_a_400_and_nothing_is_queued(api, user, allowed, url):
    response = _send(api, make_recipient(user), callback_url=url)
    assert response.status_code == 400
    assert "callback_url" in response.json()
    assert NotificationJob.objects.count() == 0 and jobs() == []


@pytest.mark.django_db
def test_a_name_in_an_allowed_zone_that_resolves_to_loopback_is_a_400(api, user, settings, resolver):
    """The case measured in issue 11: the allow list matched the name and the job was queued."""
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = [".example.test"]
    resolver.names["hooks.example.test"] = ["127.0.0.1"]
    response = _send(api, make_recipient(user), callback_url="https://hooks.example.test/mail")
    assert response.status_code == 400
    [message] = response.json()["callback_url"]
    assert "127.0.0.1" in message and "not a public address" in message
    assert NotificationJob.objects.count() == 0 and jobs() == []


@pytest.mark.django_db
def test_localhost_is_a_400_even_when_listed(api, user, settings):
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["localhost"]
    response = _send(api, make_recipient(user), callback_url="https://localhost/mail")
    assert response.status_code == 400 and "not a public address" in response.json()["callback_url"][0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url", ["https://h.example.test:99999/", "https://h.example.test:22/", "http://h.example.test/"]
)
def test_a_bad_port_or_plain_http_is_a_400(api, user, settings, url):
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = [".example.test"]
    response = _send(api, make_recipient(user), callback_url=url)
    assert response.status_code == 400
    assert list(response.json()) == ["callback_url"]
    assert NotificationJob.objects.count() == 0 and jobs() == []


@pytest.mark.django_db
def test_without_an_allow_list_every_callback_url_is_refused(api, user, settings):
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = []
    response = _send(api, make_recipient(user), callback_url="https://hooks.example.com/mail")
    assert response.status_code == 400 and "callback_url" in response.json()


@pytest.mark.django_db
def test_an_allowed_callback_url_is_stored_with_the_job(api, user, allowed):
    response = _send(api, make_recipient(user), callback_url="https://hooks.example.com/mail?x=1")
    assert response.status_code == 202
    notification = NotificationJob.objects.get(id=response.json()["job_id"])
    info = JobInfo.objects.get(job_id=notification.procrastinate_job_id)
    assert info.callback_url == "https://hooks.example.com/mail?x=1" and info.owner_id == user.id

    without = _send(api, make_recipient(user, email="sam@example.com"))
    assert without.status_code == 202
    plain = NotificationJob.objects.get(id=without.json()["job_id"])
    assert JobInfo.objects.get(job_id=plain.procrastinate_job_id).callback_url == ""


@pytest.mark.django_db(transaction=True)
def test_the_callback_is_posted_signed_once_the_email_is_delivered(allowed, smtp, settings):
    owner = make_user("olga")
    peer = WebhookPeer()
    settings.JOBS_WEBHOOK_ALLOW_HTTP = True  # the peer is plain http on 127.0.0.1 at a random port
    settings.JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True
    settings.JOBS_WEBHOOK_ALLOWED_PORTS = [peer.server.server_port]
    try:
        response = _send(client_for(owner), make_recipient(owner), callback_url=peer.url)
        assert response.status_code == 202
        run_worker(queues=["notifications"])
        run_worker(queues=["webhooks"])  # a second run: the first may stop before the delivery is queued
    finally:
        peer.stop()
    assert len(smtp.messages) == 1
    [(path, headers, body)] = peer.received
    assert path == "/hooks/mail"
    payload = json.loads(body)
    job_id = NotificationJob.objects.get(id=response.json()["job_id"]).procrastinate_job_id
    assert payload["job_id"] == job_id and payload["status"] == "succeeded"
    assert payload["task"] == "notifications.deliver"
    timestamp = int(headers["X-Secondbrain-Timestamp"])
    secret = client_for(owner).get("/api/webhooks/secret/").json()["secret"]
    assert headers["X-Secondbrain-Signature"] == webhook_signature(body=body, timestamp=timestamp, secret=secret)
    assert jobs("jobs.webhook_deliver")[0]["status"] == "succeeded"
