"""Completion webhooks: a job deferred with a callback URL is POSTed its ending, signed with its
owner's secret, by its own retried job on the `webhooks` queue (jobs/tasking/webhooks.py, the status
trigger, jobs.webhook_deliver). Receivers are real HTTP peers on 127.0.0.1 (tests/peers/webhook.py);
only DNS is replaced, by a static resolver, since it is the network edge."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator

import pytest
from django.utils import timezone

from core.errors import ApplicationError
from jobs.console import services
from jobs.models import JobInfo
from jobs.tasking import webhooks
from jobs.tasking.defer import job_defer
from jobs.tasking.registry import task_options
from tests.factories import make_user
from tests.helpers import client_for, jobs, run_worker
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_status, query
from tests.peers.webhook import ReceivedPost, StaticResolver, WebhookReceiver, self_signed_certificate

pytestmark = pytest.mark.django_db(transaction=True)

PUBLIC_ADDRESS = "93.184.215.14"  # any global address: nothing is ever sent there


@pytest.fixture
def resolver(monkeypatch) -> StaticResolver:
    """DNS for these tests: names the test adds, then the system's (so `localhost` is real)."""
    static = StaticResolver(fallback=getattr(webhooks, "webhook_resolve", None))
    monkeypatch.setattr(webhooks, "webhook_resolve", static, raising=False)
    return static


@pytest.fixture
def receiver(settings, resolver) -> Iterator[WebhookReceiver]:
    """A receiver on 127.0.0.1, plain http on a random port: the three settings that refuse
    those in production are relaxed here, as they would be in development."""
    server = WebhookReceiver().start()
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1", ".example.test"]
    settings.JOBS_WEBHOOK_ALLOW_HTTP = True
    settings.JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True
    settings.JOBS_WEBHOOK_ALLOWED_PORTS = [server.port]
    yield server
    server.stop()


def owner_secret(owner) -> str:
    """The owner's signing secret, as they read it from the API."""
    response = client_for(owner).get("/api/webhooks/secret/")
    assert response.status_code == 200, response.content
    return response.json()["secret"]


def signature_is_valid(post: ReceivedPost, *, secret: str, max_age: float = 300) -> bool:
    """What a receiver does (docs/task-authors.md shows the same code)."""
    timestamp = post.headers["X-Secondbrain-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + post.body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) <= max_age
    return fresh and hmac.compare_digest(expected, post.headers["X-Secondbrain-Signature"])


def run_jobs_then_deliveries() -> None:
    """The jobs, then their deliveries, by two worker runs: a `wait=False` run can stop before the
    delivery that a job's end queues is visible to it (issue 11, item 10), so one run would
    leave it waiting now and then."""
    run_worker([tasks.QUEUE_A])
    run_worker(["webhooks"])


def delivery_error(delivery: dict) -> str:
    return JobInfo.objects.get(job_id=delivery["id"]).error


def test_a_succeeded_job_posts_its_result_signed(receiver):
    owner = make_user("wendy")
    job_id = job_defer(tasks.echo, owner_id=owner.id, callback_url=receiver.url("/done?x=1"), value=42)

    run_jobs_then_deliveries()

    [post] = receiver.posts
    [delivery] = jobs("jobs.webhook_deliver")
    assert post.path == "/done?x=1"
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["X-Secondbrain-Delivery"] == str(delivery["id"])
    assert signature_is_valid(post, secret=owner_secret(owner))
    assert not signature_is_valid(post, secret="another-secret")
    assert post.payload == {
        "delivery_id": delivery["id"],
        "job_id": job_id,
        "task": "tests.echo",
        "queue": tasks.QUEUE_A,
        "status": "succeeded",
        "attempts": 1,
        "result": {"echo": 42},
        "error": None,
    }
    assert (delivery["status"], delivery["args"]) == ("succeeded", {"job_id": job_id, "status": "succeeded"})


def test_a_finally_failed_job_posts_its_error(receiver):
    owner = make_user("fay")
    job_id = job_defer(tasks.fail_permanently, owner_id=owner.id, callback_url=receiver.url(), reason="no such file")

    run_jobs_then_deliveries()

    [post] = receiver.posts
    assert signature_is_valid(post, secret=owner_secret(owner))
    assert post.payload["status"] == "failed"
    assert post.payload["error"] == "ProviderError: no such file"
    assert post.payload["result"] is None
    assert job_status(job_id) == "failed"


def test_a_cancelled_job_posts_its_cancellation(receiver):
    owner = make_user("cleo")
    job_id = job_defer(tasks.echo, owner_id=owner.id, callback_url=receiver.url(), value=1)
    services.job_cancel(job_id=job_id)

    run_worker(["webhooks"])

    [post] = receiver.posts
    assert signature_is_valid(post, secret=owner_secret(owner))
    assert (post.payload["job_id"], post.payload["status"]) == (job_id, "cancelled")


def test_a_job_without_callback_posts_nothing(receiver):
    job_defer(tasks.echo, owner_id=make_user("nora").id, value=1)
    run_jobs_then_deliveries()
    assert receiver.posts == []
    assert jobs("jobs.webhook_deliver") == []


def test_a_callback_needs_an_owner_whose_secret_signs_it(receiver):
    with pytest.raises(ValueError, match="owner"):
        job_defer(tasks.echo, callback_url=receiver.url(), value=1)
    assert jobs() == []


def test_deliveries_run_on_their_own_queue_with_a_time_limit(receiver, settings):
    """Not on `maintenance` with the stalled-job rescue and the purge: slow receivers cannot
    delay them. The time limit is a backstop behind the delivery's own deadline."""
    job_defer(tasks.echo, owner_id=make_user("quinn").id, callback_url=receiver.url(), value=1)
    run_worker([tasks.QUEUE_A, "maintenance"])

    [delivery] = jobs("jobs.webhook_deliver")
    assert (delivery["queue_name"], delivery["status"]) == ("webhooks", "todo")
    assert receiver.posts == []

    run_worker(["webhooks"])
    assert len(receiver.posts) == 1
    time_limit = task_options("jobs.webhook_deliver").time_limit
    assert time_limit is not None and time_limit > settings.JOBS_WEBHOOK_TIMEOUT_SECONDS


def test_a_5xx_from_the_receiver_is_retried_with_backoff_as_its_own_job(receiver):
    receiver.statuses.extend([500])
    owner = make_user("rhea")
    job_id = job_defer(tasks.echo, owner_id=owner.id, callback_url=receiver.url(), value="x")

    run_jobs_then_deliveries()

    assert len(receiver.posts) == 1
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "todo"
    assert delivery["attempts"] == 1
    assert delivery["scheduled_at"] > timezone.now()  # backoff: 2 s for the first retry
    assert job_status(job_id) == "succeeded"  # the job itself is done; only its delivery waits

    query("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE id = %s", [delivery["id"]])
    run_worker(["webhooks"])

    assert len(receiver.posts) == 2
    assert all(signature_is_valid(post, secret=owner_secret(owner)) for post in receiver.posts)
    # The same delivery: receivers deduplicate on its id.
    assert {post.headers["X-Secondbrain-Delivery"] for post in receiver.posts} == {str(delivery["id"])}
    assert receiver.posts[1].payload["result"] == {"echo": "x"}
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "succeeded"
    assert JobInfo.objects.get(job_id=delivery["id"]).result == 200


def test_a_4xx_from_the_receiver_is_not_retried(receiver):
    receiver.statuses.extend([404])
    job_defer(tasks.echo, owner_id=make_user("ivo").id, callback_url=receiver.url(), value="x")
    run_jobs_then_deliveries()
    assert len(receiver.posts) == 1
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "failed"
    assert delivery_error(delivery) == "ProviderError: callback answered HTTP 404"


# --- Signing secrets ---------------------------------------------------------------------------


def test_each_owner_signs_with_a_secret_of_their_own(receiver):
    """One receiver's secret cannot forge deliveries to another's."""
    ann, ben = make_user("ann"), make_user("ben")
    job_defer(tasks.echo, owner_id=ann.id, callback_url=receiver.url("/ann"), value=1)
    job_defer(tasks.echo, owner_id=ben.id, callback_url=receiver.url("/ben"), value=2)

    run_jobs_then_deliveries()

    posts = {post.path: post for post in receiver.posts}
    assert owner_secret(ann) != owner_secret(ben)
    assert signature_is_valid(posts["/ann"], secret=owner_secret(ann))
    assert not signature_is_valid(posts["/ann"], secret=owner_secret(ben))
    assert signature_is_valid(posts["/ben"], secret=owner_secret(ben))


def test_a_rotated_secret_signs_every_delivery_sent_after_it(receiver):
    """Deliveries queued before the rotation are signed with the secret current when they are sent."""
    owner = make_user("rosa")
    api = client_for(owner)
    old = owner_secret(owner)
    job_defer(tasks.echo, owner_id=owner.id, callback_url=receiver.url(), value=1)
    run_worker([tasks.QUEUE_A])  # the job ends; its delivery waits

    rotated = api.post("/api/webhooks/secret/rotate/")
    assert rotated.status_code == 200, rotated.content
    new = rotated.json()["secret"]
    assert new != old and owner_secret(owner) == new

    run_worker(["webhooks"])
    [post] = receiver.posts
    assert signature_is_valid(post, secret=new)
    assert not signature_is_valid(post, secret=old)


def test_the_secret_api_needs_authentication(client):
    assert client.get("/api/webhooks/secret/").status_code == 401
    assert client.post("/api/webhooks/secret/rotate/").status_code == 401


# --- Hostile receivers ------------------------------------------------------------------------


def test_a_dripping_receiver_is_cut_off_at_the_total_deadline(receiver, settings):
    """One byte a second: each socket read is quick, so only a deadline for the whole delivery
    frees the worker slot. The delivery then counts as a transient failure and is retried."""
    settings.JOBS_WEBHOOK_TIMEOUT_SECONDS = 2
    receiver.drip_seconds = 1
    job_defer(tasks.echo, owner_id=make_user("dora").id, callback_url=receiver.url(), value=1)

    run_jobs_then_deliveries()

    [delivery] = jobs("jobs.webhook_deliver")
    assert (delivery["status"], delivery["attempts"]) == ("todo", 1)  # waiting for its retry
    assert "deadline" in delivery_error(delivery)
    [streamed] = receiver.streamed
    assert not streamed.finished  # the worker hung up long before the last byte


def test_an_endless_body_is_read_only_up_to_the_cap(receiver, settings):
    settings.JOBS_WEBHOOK_MAX_RESPONSE_BYTES = 65536
    receiver.endless_body_bytes = 128 * 1024 * 1024
    job_defer(tasks.echo, owner_id=make_user("enzo").id, callback_url=receiver.url(), value=1)

    run_jobs_then_deliveries()

    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "succeeded"
    assert JobInfo.objects.get(job_id=delivery["id"]).result == 200
    [streamed] = receiver.streamed
    assert not streamed.finished
    assert streamed.bytes_sent < 32 * 1024 * 1024  # the cap plus what the kernel's buffers took


def test_a_redirect_to_a_private_address_is_not_followed(receiver):
    target = WebhookReceiver().start()
    try:
        receiver.redirect_to = target.url("/stolen")
        job_defer(tasks.echo, owner_id=make_user("remy").id, callback_url=receiver.url(), value=1)
        run_jobs_then_deliveries()
    finally:
        target.stop()
    assert len(receiver.posts) == 1 and target.posts == []
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "failed"  # permanent: a redirect is an answer, not a place to go
    assert delivery_error(delivery) == "ProviderError: callback answered HTTP 302 (redirects are not followed)"


# --- Where the connection goes ----------------------------------------------------------------


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(receiver, resolver):
    resolver.names["hooks.example.test"] = ["127.0.0.1"]
    job_defer(tasks.echo, owner_id=make_user("hana").id, callback_url=receiver.url(host="hooks.example.test"), value=1)

    run_jobs_then_deliveries()

    [post] = receiver.posts
    assert post.headers["Host"] == f"hooks.example.test:{receiver.port}"
    assert jobs("jobs.webhook_deliver")[0]["status"] == "succeeded"


@pytest.fixture
def tls_receiver(tmp_path, settings, resolver) -> Iterator[tuple[WebhookReceiver, str]]:
    """An https receiver on 127.0.0.1 with a certificate for hooks.example.test, that name
    resolving to it, and plain http refused as in production."""
    certfile, keyfile = self_signed_certificate(str(tmp_path), "hooks.example.test")
    server = WebhookReceiver(certfile=certfile, keyfile=keyfile).start()
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = [".example.test"]
    settings.JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True
    settings.JOBS_WEBHOOK_ALLOWED_PORTS = [server.port]
    resolver.names["hooks.example.test"] = ["127.0.0.1"]
    resolver.names["other.example.test"] = ["127.0.0.1"]
    yield server, certfile
    server.stop()


def test_https_goes_to_the_checked_address_with_the_name_as_sni_and_a_checked_certificate(tls_receiver, monkeypatch):
    server, certfile = tls_receiver
    monkeypatch.setenv("SSL_CERT_FILE", certfile)  # OpenSSL's trust store: this receiver's certificate
    job_defer(tasks.echo, owner_id=make_user("tess").id, callback_url=server.url(host="hooks.example.test"), value=1)
    # The same receiver under another name: its certificate does not match, nothing is sent.
    job_defer(
        tasks.echo, owner_id=make_user("otto").id, callback_url=server.url("/other", host="other.example.test"), value=2
    )

    run_jobs_then_deliveries()

    [post] = server.posts
    assert post.path == "/hook" and post.headers["Host"] == f"hooks.example.test:{server.port}"
    assert "hooks.example.test" in server.server_names
    deliveries = {d["args"]["job_id"]: d for d in jobs("jobs.webhook_deliver")}
    assert [d["status"] for d in deliveries.values()] == ["succeeded", "todo"]  # the mismatch is retried
    assert "certificate" in delivery_error(list(deliveries.values())[1]).lower()


def test_an_untrusted_certificate_is_not_sent_anything(tls_receiver):
    server, _ = tls_receiver
    job_defer(tasks.echo, owner_id=make_user("ulla").id, callback_url=server.url(host="hooks.example.test"), value=1)
    run_jobs_then_deliveries()
    assert server.posts == []
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "todo" and "CERTIFICATE_VERIFY_FAILED" in delivery_error(delivery)


def test_a_name_that_resolves_to_loopback_at_delivery_is_not_called(receiver, resolver, settings):
    """DNS rebinding: public when the job was deferred, 127.0.0.1 when the delivery runs."""
    settings.JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
    resolver.names["rebind.example.test"] = [PUBLIC_ADDRESS]
    job_defer(tasks.echo, owner_id=make_user("reba").id, callback_url=receiver.url(host="rebind.example.test"), value=1)
    resolver.names["rebind.example.test"] = ["127.0.0.1"]

    run_jobs_then_deliveries()

    assert receiver.posts == []
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "failed"  # permanent: not retried
    assert "resolves to 127.0.0.1, which is not a public address" in delivery_error(delivery)


def test_an_allowed_network_lets_a_private_receiver_in(receiver, resolver, settings):
    settings.JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
    settings.JOBS_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    resolver.names["internal.example.test"] = ["127.0.0.1"]
    job_defer(
        tasks.echo, owner_id=make_user("nell").id, callback_url=receiver.url(host="internal.example.test"), value=1
    )
    run_jobs_then_deliveries()
    assert len(receiver.posts) == 1


def test_a_host_removed_from_the_allow_list_is_not_called_at_delivery(receiver, settings):
    job_id = job_defer(tasks.echo, owner_id=make_user("hal").id, callback_url=receiver.url(), value=1)
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.org"]

    run_jobs_then_deliveries()

    assert receiver.posts == []
    assert job_status(job_id) == "succeeded"
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "failed"  # permanent: not retried
    assert "not in JOBS_WEBHOOK_ALLOWED_HOSTS" in delivery_error(delivery)


# --- Registration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/hook", "JOBS_WEBHOOK_ALLOWED_HOSTS"),
        ("http://127.0.0.1.example.com/hook", "JOBS_WEBHOOK_ALLOWED_HOSTS"),
        ("ftp://127.0.0.1/hook", "https"),
        ("http:///hook", "https"),
        ("not a url", "https"),
        ("https://h.example.test:99999/", "port"),
        ("https://h.example.test:8443/", "port"),
        ("https://h.example.test:0/", "port"),
        ("https://" + "a" * 64 + ".example.test/", "not a valid host name"),  # no IDNA form: not a 500
    ],
)
def test_a_url_outside_the_rules_is_refused_at_defer_time(receiver, url, reason):
    with pytest.raises(ApplicationError) as refused:
        job_defer(tasks.echo, owner_id=make_user("pat").id, callback_url=url, value=1)
    assert refused.value.status_code == 400
    assert list(refused.value.extra) == ["callback_url"]
    assert reason in refused.value.extra["callback_url"][0]
    assert jobs() == []


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("https://localhost/hook", None),  # the real resolver: localhost is 127.0.0.1
        ("https://hooks.example.test/hook", "127.0.0.1"),
        ("https://meta.example.test/latest/meta-data/", "169.254.169.254"),
        ("https://lan.example.test/hook", "10.1.2.3"),
        ("https://mixed.example.test/hook", [PUBLIC_ADDRESS, "192.168.0.10"]),  # any one refused is enough
        ("https://v6.example.test/hook", "::1"),
        ("https://mapped.example.test/hook", "::ffff:127.0.0.1"),
        ("https://multicast.example.test/hook", "224.0.0.251"),
        ("https://169.254.169.254/latest/meta-data/", None),
    ],
)
def test_a_name_resolving_to_a_private_address_is_refused_at_defer_time(receiver, resolver, settings, url, address):
    settings.JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = [".example.test", "localhost", "169.254.169.254"]
    if address is not None:
        host = url.split("/")[2]
        resolver.names[host] = address if isinstance(address, list) else [address]
    with pytest.raises(ApplicationError) as refused:
        job_defer(tasks.echo, owner_id=make_user("pam").id, callback_url=url, value=1)
    assert refused.value.status_code == 400
    assert "not a public address" in refused.value.extra["callback_url"][0]
    assert jobs() == []


def test_plain_http_is_refused_unless_allowed(receiver, settings):
    settings.JOBS_WEBHOOK_ALLOW_HTTP = False
    with pytest.raises(ApplicationError) as refused:
        job_defer(tasks.echo, owner_id=make_user("hugo").id, callback_url=receiver.url(), value=1)
    assert "https" in refused.value.extra["callback_url"][0]


def test_a_name_that_does_not_resolve_yet_is_accepted_and_checked_at_delivery(receiver, resolver):
    """DNS may be down when the job is deferred; the delivery checks again (and retries)."""
    job_id = job_defer(
        tasks.echo, owner_id=make_user("nina").id, callback_url="https://later.example.test/hook", value=1
    )
    assert job_id is not None
