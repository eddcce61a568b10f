"""Completion webhooks: a job deferred with a callback URL is POSTed its ending, signed, by its
own retried job (jobs/webhooks.py, the status trigger of migration 0002, jobs.webhook_deliver)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator

import pytest
from django.utils import timezone

from core.errors import ApplicationError
from jobs import services
from jobs.models import JobInfo
from tests.conftest import jobs, run_worker
from tests.factories import make_user
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_status, query
from tests.peers.webhook import ReceivedPost, WebhookReceiver

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "webhook-test-secret"
QUEUES = [tasks.QUEUE_A, "maintenance"]


@pytest.fixture
def receiver(settings) -> Iterator[WebhookReceiver]:
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.JOBS_WEBHOOK_SECRET = SECRET
    server = WebhookReceiver().start()
    yield server
    server.stop()


def signature_is_valid(post: ReceivedPost, *, secret: str = SECRET, max_age: float = 300) -> bool:
    """What a receiver does (the README shows the same code)."""
    timestamp = post.headers["X-Secondbrain-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + post.body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) <= max_age
    return fresh and hmac.compare_digest(expected, post.headers["X-Secondbrain-Signature"])


def test_a_succeeded_job_posts_its_result_signed(receiver):
    owner = make_user("wendy")
    job_id = services.job_defer(tasks.echo, owner_id=owner.id, callback_url=receiver.url("/done?x=1"), value=42)

    run_worker(QUEUES)

    [post] = receiver.posts
    assert post.path == "/done?x=1"
    assert post.headers["Content-Type"] == "application/json"
    assert signature_is_valid(post)
    assert not signature_is_valid(post, secret="another-secret")
    assert post.payload == {
        "job_id": job_id,
        "task": "tests.echo",
        "queue": tasks.QUEUE_A,
        "status": "succeeded",
        "attempts": 1,
        "result": {"echo": 42},
        "error": None,
    }
    [delivery] = jobs("jobs.webhook_deliver")
    assert (delivery["status"], delivery["args"]) == ("succeeded", {"job_id": job_id, "status": "succeeded"})


def test_a_finally_failed_job_posts_its_error(receiver):
    job_id = services.job_defer(tasks.fail_permanently, callback_url=receiver.url(), reason="no such file")

    run_worker(QUEUES)

    [post] = receiver.posts
    assert signature_is_valid(post)
    assert post.payload["status"] == "failed"
    assert post.payload["error"] == "ProviderError: no such file"
    assert post.payload["result"] is None
    assert job_status(job_id) == "failed"


def test_a_cancelled_job_posts_its_cancellation(receiver):
    job_id = services.job_defer(tasks.echo, callback_url=receiver.url(), value=1)
    services.job_cancel(job_id=job_id)

    run_worker(["maintenance"])

    [post] = receiver.posts
    assert signature_is_valid(post)
    assert (post.payload["job_id"], post.payload["status"]) == (job_id, "cancelled")


def test_a_job_without_callback_posts_nothing(receiver):
    services.job_defer(tasks.echo, owner_id=make_user("nora").id, value=1)
    run_worker(QUEUES)
    assert receiver.posts == []
    assert jobs("jobs.webhook_deliver") == []


def test_a_5xx_from_the_receiver_is_retried_with_backoff_as_its_own_job(receiver):
    receiver.statuses.extend([500])
    job_id = services.job_defer(tasks.echo, callback_url=receiver.url(), value="x")

    run_worker(QUEUES)

    assert len(receiver.posts) == 1
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "todo"
    assert delivery["attempts"] == 1
    assert delivery["scheduled_at"] > timezone.now()  # backoff: 2 s for the first retry
    assert job_status(job_id) == "succeeded"  # the job itself is done; only its delivery waits

    query("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE id = %s", [delivery["id"]])
    run_worker(["maintenance"])

    assert len(receiver.posts) == 2
    assert all(signature_is_valid(post) for post in receiver.posts)
    assert receiver.posts[1].payload["result"] == {"echo": "x"}
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "succeeded"
    assert JobInfo.objects.get(job_id=delivery["id"]).result == 200


def test_a_4xx_from_the_receiver_is_not_retried(receiver):
    receiver.statuses.extend([404])
    services.job_defer(tasks.echo, callback_url=receiver.url(), value="x")
    run_worker(QUEUES)
    assert len(receiver.posts) == 1
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "failed"
    assert JobInfo.objects.get(job_id=delivery["id"]).error == "ProviderError: callback answered HTTP 404"


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "http://127.0.0.1.example.com/hook",
        "ftp://127.0.0.1/hook",
        "http:///hook",
        "not a url",
    ],
)
def test_a_host_outside_the_allow_list_is_refused_at_defer_time(receiver, url):
    with pytest.raises(ApplicationError) as refused:
        services.job_defer(tasks.echo, callback_url=url, value=1)
    assert refused.value.status_code == 400
    assert list(refused.value.extra) == ["callback_url"]
    assert jobs() == []


def test_a_host_removed_from_the_allow_list_is_not_called_at_delivery(receiver, settings):
    job_id = services.job_defer(tasks.echo, callback_url=receiver.url(), value=1)
    settings.JOBS_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.org"]

    run_worker(QUEUES)

    assert receiver.posts == []
    assert job_status(job_id) == "succeeded"
    [delivery] = jobs("jobs.webhook_deliver")
    assert delivery["status"] == "failed"  # permanent: not retried
    assert "not in JOBS_WEBHOOK_ALLOWED_HOSTS" in JobInfo.objects.get(job_id=delivery["id"]).error
