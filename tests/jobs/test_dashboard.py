from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection, connections
from django.test import Client
from django.utils import timezone
from procrastinate.contrib.django import app

from jobs.models import JobInfo, PausedQueue
from tests.factories import make_user
from tests.helpers import job_move, jobs

pytestmark = pytest.mark.django_db

DASHBOARD = "/admin/jobs/dashboard/"
DATA = DASHBOARD + "data/"


def make_job(
    task: str,
    queue: str,
    status: str = "todo",
    *,
    error: str = "",
    processed: int | None = None,
    total: int | None = None,
    waited: float | None = None,
    ran: float | None = None,
    ended_ago: float = 60.0,
) -> int:
    """A real job row moved through real status changes, so Procrastinate's triggers write its
    events. `waited`/`ran` (seconds) then re-date those events: due -> started -> ended, ending
    `ended_ago` seconds ago (one transaction's now() would make every duration zero)."""
    job_id = app.configure_task(name=task, queue=queue).defer()
    job_move(job_id, status)
    with connection.cursor() as cursor:
        if waited is not None or ran is not None:
            end = timezone.now() - timedelta(seconds=ended_ago)
            started = end - timedelta(seconds=ran or 0)
            due = started - timedelta(seconds=waited or 0)
            for kind, at in (("deferred", due), ("started", started)):
                cursor.execute(
                    "UPDATE procrastinate_events SET at = %s WHERE job_id = %s AND type = %s", [at, job_id, kind]
                )
            cursor.execute(
                "UPDATE procrastinate_events SET at = %s"
                " WHERE job_id = %s AND type IN ('succeeded', 'failed', 'aborted')",
                [end, job_id],
            )
    if error or processed is not None or total is not None:
        JobInfo.objects.update_or_create(
            job_id=job_id,
            defaults={"error": error, "processed": processed, "total": total, "progress_at": timezone.now()},
        )
    return job_id


def staff(username: str, *perms: str, superuser: bool = False):
    user = make_user(username, is_staff=True, is_superuser=superuser)
    for perm in perms:
        user.user_permissions.add(Permission.objects.get(codename=perm, content_type__app_label="jobs"))
    return user


def client_of(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


@pytest.fixture
def operator() -> Client:
    return client_of(staff("operator", "retry_job", "pause_queue"))


@pytest.fixture
def viewer() -> Client:
    """Staff without the job permissions: sees the dashboard, cannot act."""
    return client_of(staff("viewer"))


def test_anonymous_and_non_staff_are_sent_to_the_admin_login(client):
    for path in (DASHBOARD, DATA):
        response = client.get(path)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.force_login(make_user("plain"))
    assert client.get(DASHBOARD)["Location"].startswith("/admin/login/")


def test_page_is_inside_the_admin_with_the_first_snapshot(operator):
    make_job("imports.run", "imports")
    response = operator.get(DASHBOARD)
    assert response.status_code == 200
    page = response.content.decode()
    assert "Job dashboard" in page and 'id="site-name"' in page  # admin/base_site.html
    assert "jobs/dashboard.js" in page and 'id="dashboard-snapshot"' in page
    snapshot = response.context["snapshot"]
    assert {q["name"]: q["counts"]["todo"] for q in snapshot["queues"]}["imports"] == 1


def test_data_reports_depths_failures_progress_workers_and_pauses(operator):
    for _ in range(3):
        make_job("notes.enrich", "enrichment")
    make_job("notes.enrich", "enrichment", "doing")
    make_job("notifications.deliver", "notifications", "failed", error="SMTPServerDisconnected: boom 1")
    make_job("notifications.deliver", "notifications", "failed", error="SMTPServerDisconnected: boom 2")
    running = make_job("imports.run", "imports", "doing", processed=250, total=1000)
    PausedQueue.objects.create(queue_name="digests")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat, jobs_host)"
            " VALUES (now(), 'worker-host-1'), (now() - interval '1 hour', 'worker-host-2') RETURNING id"
        )
        live_id = cursor.fetchone()[0]
        cursor.execute("UPDATE procrastinate_jobs SET worker_id = %s WHERE id = %s", [live_id, running])

    data = operator.get(DATA).json()

    depth = {q["name"]: q["counts"] for q in data["queues"]}
    assert depth["enrichment"]["todo"] == 3 and depth["enrichment"]["doing"] == 1
    assert depth["notifications"]["failed"] == 2
    assert set(depth) >= {"enrichment", "notifications", "digests", "imports", "maintenance"}
    assert [q["name"] for q in data["paused"]] == ["digests"]
    [failing] = data["failing"]
    assert failing["task"] == "notifications.deliver" and failing["failed"] == 2 and failing["recent_failures"] == 2
    assert failing["last_error"] == "SMTPServerDisconnected: boom 2"  # the newest failed job's
    [progress] = data["running"]
    assert progress == {**progress, "job_id": running, "processed": 250, "total": 1000, "percent": 25.0}
    assert [w["id"] for w in data["workers"]] == [live_id]
    assert data["workers"][0]["running"] == 1
    assert data["workers"][0]["host"] == "worker-host-1"
    assert data["permissions"] == {"retry": True, "pause": True, "cancel": False}
    assert sum(b["failed"] for b in data["throughput"]["hour"]) == 2
    assert len(data["throughput"]["hour"]) == 60 and len(data["throughput"]["day"]) == 24


def test_data_has_latency_percentiles_per_task(operator):
    for waited, ran in ((1, 2), (2, 4), (3, 6)):
        make_job("digests.weekly", "digests", "succeeded", waited=waited, ran=ran)
    data = operator.get(DATA).json()
    [row] = [r for r in data["latency"] if r["task"] == "digests.weekly"]
    assert row["started"] == 3 and row["finished"] == 3
    assert row["wait_ms"]["p50"] == pytest.approx(2000, abs=5)
    assert row["run_ms"]["p50"] == pytest.approx(4000, abs=5)
    assert 4000 < row["run_ms"]["p95"] <= 6000 and row["run_ms"]["p95"] <= row["run_ms"]["p99"] <= 6000
    assert sum(b["succeeded"] for b in data["throughput"]["day"]) == 3


def test_retry_failed_requeues_only_that_tasks_failed_jobs(operator):
    failed = [make_job("notifications.deliver", "notifications", "failed") for _ in range(2)]
    other = make_job("notes.enrich", "enrichment", "failed")
    response = operator.post(
        DASHBOARD + "retry-failed/", {"task": "notifications.deliver"}, content_type="application/json"
    )
    assert response.status_code == 200
    assert response.json() == {"task": "notifications.deliver", "retried": 2, "skipped": 0, "skipped_jobs": []}
    statuses = {job["id"]: job["status"] for job in jobs()}
    assert [statuses[i] for i in failed] == ["todo", "todo"] and statuses[other] == "failed"


def test_pause_and_resume_a_queue(operator):
    response = operator.post(DASHBOARD + "pause/", {"queue": "imports"}, content_type="application/json")
    assert response.status_code == 200 and response.json() == {"queue": "imports", "paused": True}
    paused = PausedQueue.objects.get(queue_name="imports")
    assert paused.paused_by.username == "operator"
    assert [q["name"] for q in operator.get(DATA).json()["paused"]] == ["imports"]
    response = operator.post(DASHBOARD + "resume/", {"queue": "imports"}, content_type="application/json")
    assert response.json() == {"queue": "imports", "paused": False}
    assert not PausedQueue.objects.exists()


def test_actions_answer_403_json_without_the_permission(viewer):
    make_job("notifications.deliver", "notifications", "failed")
    for path, body in (("retry-failed/", {"task": "notifications.deliver"}), ("pause/", {"queue": "imports"})):
        response = viewer.post(DASHBOARD + path, body, content_type="application/json")
        assert response.status_code == 403 and "permission" in response.json()["detail"]
    assert jobs()[0]["status"] == "failed" and not PausedQueue.objects.exists()
    assert viewer.get(DATA).json()["permissions"] == {"retry": False, "pause": False, "cancel": False}


def test_pause_permission_alone_does_not_allow_retry():
    client = client_of(staff("pauser", "pause_queue"))
    make_job("notifications.deliver", "notifications", "failed")
    assert client.post(DASHBOARD + "retry-failed/", {"task": "notifications.deliver"}).status_code == 403
    assert client.post(DASHBOARD + "pause/", {"queue": "imports"}).status_code == 200  # form-encoded works too
    assert client.get(DATA).json()["permissions"] == {"retry": False, "pause": True, "cancel": False}


def test_actions_refuse_non_staff_even_with_the_permission():
    user = make_user("insider")
    user.user_permissions.add(Permission.objects.get(codename="pause_queue"))
    response = client_of(user).post(DASHBOARD + "pause/", {"queue": "imports"}, content_type="application/json")
    assert response.status_code == 403 and not PausedQueue.objects.exists()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("pause/", {"queue": "nope"}, "queue"),
        ("pause/", {}, "queue"),
        ("resume/", {"queue": ["imports"]}, "queue"),
        ("retry-failed/", {"task": ""}, "task"),
        ("retry-failed/", {"task": "x" * 200}, "task"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(operator, path, body, field):
    response = operator.post(DASHBOARD + path, body, content_type="application/json")
    assert response.status_code == 400
    assert field in response.json()
    assert not PausedQueue.objects.exists()


def test_malformed_json_and_wrong_method(operator):
    response = operator.post(DASHBOARD + "pause/", "{not json", content_type="application/json")
    assert response.status_code == 400 and response.json()["detail"] == "The body is not valid JSON."
    assert operator.post(DASHBOARD + "pause/", "[1]", content_type="application/json").status_code == 400
    assert operator.get(DASHBOARD + "pause/").status_code == 405


def test_actions_need_the_csrf_token():
    user = staff("careful", "pause_queue")
    client = client_of(user, enforce_csrf_checks=True)
    assert client.post(DASHBOARD + "pause/", {"queue": "imports"}, content_type="application/json").status_code == 403
    page = client.get(DASHBOARD).content.decode()
    token = page.split('data-csrf-token="', 1)[1].split('"', 1)[0]
    response = client.post(
        DASHBOARD + "pause/", json.dumps({"queue": "imports"}), content_type="application/json", HTTP_X_CSRFTOKEN=token
    )
    assert response.status_code == 200 and PausedQueue.objects.filter(queue_name="imports").exists()


def test_dashboard_js_and_css_are_served_by_staticfiles():
    from django.contrib.staticfiles import finders

    assert finders.find("jobs/dashboard.js") and finders.find("jobs/dashboard.css")


# --- In a real browser --------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium); Playwright downloads nothing
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser_page(monkeypatch):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API keeps its event loop running in this thread; the ORM calls the test
    # makes between browser steps are plain blocking calls, which Django would refuse there.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()
            # Inside sync_playwright the code runs in another contextvars context, so Django
            # opened a second connection here: close it, or dropping the test database fails.
            connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_dashboard_in_a_browser_updates_live_pauses_and_retries(live_server, browser_page):
    make_user("boss", password="a-long-admin-password", is_staff=True, is_superuser=True)
    for _ in range(3):
        make_job("imports.run", "imports")
    failed = [
        make_job("notifications.deliver", "notifications", "failed", error="SMTPServerDisconnected: gone")
        for _ in range(2)
    ]
    page = browser_page

    page.goto(f"{live_server.url}/admin/login/?next={DASHBOARD}")
    page.fill("#id_username", "boss")
    page.fill("#id_password", "a-long-admin-password")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}{DASHBOARD}")

    imports_todo = page.locator('#dash-queues tr[data-queue="imports"] td[data-status="todo"]')
    assert imports_todo.inner_text() == "3"
    failing = page.locator('#dash-failing tr[data-task="notifications.deliver"]')
    assert "SMTPServerDisconnected: gone" in failing.inner_text()
    # Anything that reloads the page wipes this marker.
    page.evaluate("window.notReloaded = true")

    # A job deferred now shows up at the next poll.
    make_job("imports.run", "imports")
    page.wait_for_function(
        "document.querySelector('#dash-queues tr[data-queue=\"imports\"] td[data-status=\"todo\"]').textContent === '4'"
    )

    page.click('#dash-queues tr[data-queue="imports"] button[data-action="pause"]')
    page.wait_for_selector('#dash-queues tr[data-queue="imports"][data-paused="true"]')
    assert page.locator("#dash-message").inner_text() == "Queue imports paused."
    assert page.locator('#dash-paused li[data-queue="imports"]').count() == 1
    assert PausedQueue.objects.filter(queue_name="imports", paused_by__username="boss").exists()

    failing.locator('button[data-action="retry"]').click()
    page.wait_for_function("document.querySelector('#dash-message').textContent.startsWith('Retried 2')")
    statuses = {job["id"]: job["status"] for job in jobs("notifications.deliver")}
    assert [statuses[i] for i in failed] == ["todo", "todo"]
    # Nothing failed any more: the row keeps its recent failures but loses its button.
    page.wait_for_function(
        "!document.querySelector('#dash-failing tr[data-task=\"notifications.deliver\"] button[data-action]')"
    )
    page.wait_for_selector('#dash-queues tr[data-queue="notifications"] td[data-status="todo"]:text-is("2")')

    assert page.evaluate("window.notReloaded") is True
    page.screenshot(path=os.path.join(tempfile.gettempdir(), "secondbrain-dashboard.png"), full_page=True)


def test_data_shows_batches_with_progress_and_jobs_blocked_by_their_parents(operator):
    from jobs.tasking.defer import job_defer
    from jobs.tasking.workflows import job_batch
    from tests.jobs import tasks_for_tests as tasks

    with job_batch(name="nightly") as batch:
        members = [job_defer(tasks.echo, value=i) for i in range(4)]
    child = job_defer(tasks.echo, after=members[:2], value="after")
    with connection.cursor() as cursor:  # one member ends
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", [members[0]])
        cursor.execute("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = %s", [members[0]])

    data = operator.get(DATA).json()

    [shown] = data["batches"]
    assert (shown["id"], shown["name"], shown["state"], shown["done"], shown["total"], shown["percent"]) == (
        batch.id,
        "nightly",
        "sealed",
        1,
        4,
        25.0,
    )
    assert data["blocked"] == [
        {
            "job_id": child,
            "task": "tests.echo",
            "queue": tasks.QUEUE_A,
            "parents_waiting": 1,
            "waiting_for": [members[1]],
        }
    ]


def test_batch_actions_cancel_and_retry_with_their_permissions(operator):
    from jobs.tasking.defer import job_defer
    from jobs.tasking.workflows import job_batch
    from tests.jobs import tasks_for_tests as tasks

    with job_batch() as batch:
        waiting = job_defer(tasks.echo, value=1)
        failed = job_defer(tasks.echo, value=2)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", [failed])
        cursor.execute("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = %s", [failed])

    response = operator.post(DASHBOARD + "batch-cancel/", {"batch": batch.id}, content_type="application/json")
    assert response.status_code == 403  # the operator may retry and pause, not cancel
    response = operator.post(DASHBOARD + "batch-retry/", {"batch": batch.id}, content_type="application/json")
    assert response.json() == {"batch": batch.id, "retried": [failed], "refused": []}
    canceller = client_of(staff("canceller", "cancel_job"))
    response = canceller.post(DASHBOARD + "batch-cancel/", {"batch": batch.id}, content_type="application/json")
    assert response.json() == {"batch": batch.id, "cancelled": 2}
    statuses = {job["id"]: job["status"] for job in jobs()}
    assert [statuses[waiting], statuses[failed]] == ["cancelled", "cancelled"]


def test_data_shows_the_concurrency_limits_in_force(operator):
    from jobs.tasking.defer import job_defer_bulk
    from tests.jobs import tasks_for_tests as tasks

    ids = job_defer_bulk(tasks.limited_slots, [{"group": "a"}] * 3 + [{"group": "b"}])
    with connection.cursor() as cursor:  # two of key a and the one of key b run
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = ANY(%s)", [[ids[0], ids[1], ids[3]]])

    data = operator.get(DATA).json()

    assert data["limits"] == [
        {"key": "group:a", "limit": tasks.CONCURRENCY, "running": 2, "waiting": 1, "counted": 2},
        {"key": "group:b", "limit": tasks.CONCURRENCY, "running": 1, "waiting": 0, "counted": 1},
    ]
    page = operator.get(DASHBOARD).content.decode()
    assert 'id="dash-limits"' in page
