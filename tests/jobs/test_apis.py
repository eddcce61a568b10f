"""The jobs API: ownership, filters, the timeline of a job a real worker ran, cancel and retry,
the staff permission matrix, and queue pause/resume with a real worker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.utils import timezone

from jobs.models import JobInfo
from jobs.tasking import queues
from jobs.tasking.defer import job_defer
from jobs.tasking.progress import job_progress
from jobs.tasking.registry import job_task
from tests.factories import make_user
from tests.helpers import client_for, jobs, run_worker

# How many more times `flaky` fails before it succeeds.
FLAKY = {"failures_left": 0}


@job_task(name="tests.jobs_api.add", queue=queues.IMPORTS, pass_context=True)
def add(context, *, a: int, b: int) -> dict:
    job_progress(context, processed=1, total=2, step="adding")
    job_progress(context, processed=2, total=2, step="done")
    return {"sum": a + b}


@job_task(name="tests.jobs_api.flaky", queue=queues.IMPORTS)
def flaky(*, n: int) -> int:
    if FLAKY["failures_left"] > 0:
        FLAKY["failures_left"] -= 1
        raise RuntimeError("the flaky task failed")
    return n


@job_task(name="tests.jobs_api.mail", queue=queues.NOTIFICATIONS)
def mail(*, n: int) -> None:
    return None


def _staff(username: str, *perms: str):
    staff = make_user(username, is_staff=True)
    for codename in perms:
        staff.user_permissions.add(Permission.objects.get(content_type__app_label="jobs", codename=codename))
    return staff


def _status(job_id: int) -> str:
    return next(j["status"] for j in jobs() if j["id"] == job_id)


# --- ownership -----------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_user_sees_only_their_jobs_and_staff_see_all(api, user, other_user):
    mine = [job_defer(add, owner_id=user.id, a=1, b=i) for i in range(2)]
    theirs = job_defer(add, owner_id=other_user.id, a=1, b=1)
    ownerless = add.defer(a=0, b=0)  # like a periodic job: no info row

    listed = api.get("/api/jobs/")
    assert listed.status_code == 200
    assert [j["id"] for j in listed.json()["results"]] == mine[::-1]  # newest first
    item = listed.json()["results"][0]
    assert item["task"] == "tests.jobs_api.add" and item["queue"] == "imports" and item["status"] == "todo"
    assert item["created_at"] is not None and item["progress"] is None

    for path in (f"/api/jobs/{theirs}/", f"/api/jobs/{ownerless}/", f"/api/jobs/{theirs}/stream/"):
        assert api.get(path).status_code == 404, path
    assert api.delete(f"/api/jobs/{theirs}/").status_code == 404
    assert api.post(f"/api/jobs/{theirs}/retry/").status_code == 404
    assert api.get("/api/jobs/999999/").status_code == 404
    assert _status(theirs) == "todo"

    staff = client_for(_staff("sam"))
    assert {j["id"] for j in staff.get("/api/jobs/").json()["results"]} == {*mine, theirs, ownerless}
    assert staff.get(f"/api/jobs/{ownerless}/").json()["owner_id"] is None

    assert client_for(other_user).get("/api/jobs/").json()["count"] == 1


@pytest.mark.django_db
def test_the_api_needs_authentication(client):
    assert client.get("/api/jobs/").status_code in (401, 403)
    assert client.get("/api/jobs/metrics/").status_code in (401, 403)


# --- filters, ordering, pagination ---------------------------------------------------------
@pytest.mark.django_db
def test_filters_by_status_including_scheduled_and_waiting_by_queue_and_task(api, user):
    later = job_defer(add, owner_id=user.id, schedule_at=timezone.now() + timedelta(hours=1), a=1, b=2)
    due = job_defer(add, owner_id=user.id, priority=5, a=1, b=3)
    overdue = job_defer(add, owner_id=user.id, schedule_at=timezone.now() - timedelta(minutes=1), a=1, b=4)
    other_queue = job_defer(mail, owner_id=user.id, n=1)
    cancelled = job_defer(flaky, owner_id=user.id, n=1)
    assert api.delete(f"/api/jobs/{cancelled}/").status_code == 204

    def ids(query: str) -> list[int]:
        response = api.get(f"/api/jobs/?{query}")
        assert response.status_code == 200, response.json()
        return [j["id"] for j in response.json()["results"]]

    assert ids("status=scheduled") == [later]
    assert api.get(f"/api/jobs/{later}/").json()["status"] == "scheduled"
    assert {j["id"]: j["status"] for j in api.get("/api/jobs/").json()["results"]}[later] == "scheduled"
    assert ids("status=waiting") == [other_queue, overdue, due]
    assert ids("status=todo") == [other_queue, overdue, due, later]
    assert ids("status=cancelled") == [cancelled]
    assert ids("status=succeeded") == []
    assert ids("queue=notifications") == [other_queue]
    assert ids("task=tests.jobs_api.flaky") == [cancelled]
    assert ids("queue=imports&status=waiting") == [overdue, due]
    assert ids("ordering=-priority")[0] == due
    assert ids("ordering=id") == [later, due, overdue, other_queue, cancelled]

    bad = api.get("/api/jobs/?status=sleeping")
    assert bad.status_code == 400 and "status" in bad.json()

    page = api.get("/api/jobs/?page=1").json()
    assert page["count"] == 5 and {"next", "previous", "results"} <= set(page)
    assert api.get("/api/jobs/?page=9").status_code == 404


# --- detail, cancel, retry with a real worker ----------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_detail_shows_the_timeline_progress_and_result_of_a_job_a_worker_ran():
    owner = make_user("erin")
    api = client_for(owner)
    job_id = job_defer(add, owner_id=owner.id, lock="sums", queueing_lock="sum-1", a=2, b=3)
    waiting = api.get(f"/api/jobs/{job_id}/").json()
    assert [e["type"] for e in waiting["timeline"]] == ["deferred"]
    assert waiting["run_time_ms"] is None and waiting["wait_time_ms"] >= 0

    run_worker(queues=["imports"])

    detail = api.get(f"/api/jobs/{job_id}/").json()
    assert detail["status"] == "succeeded" and detail["attempts"] == 1
    assert detail["args"] == {"a": 2, "b": 3}
    assert (detail["lock"], detail["queueing_lock"]) == ("sums", "sum-1")
    assert [e["type"] for e in detail["timeline"]] == ["deferred", "started", "succeeded"]
    first, *rest = detail["timeline"]
    assert first["duration_ms"] is None and all(e["duration_ms"] >= 0 for e in rest)
    assert detail["created_at"] == first["at"]
    assert detail["run_time_ms"] == pytest.approx(rest[1]["duration_ms"], abs=0.2)
    assert detail["wait_time_ms"] == pytest.approx(rest[0]["duration_ms"], abs=0.2)
    assert detail["progress"]["processed"] == 2 and detail["progress"]["total"] == 2
    assert detail["progress"]["percent"] == 100.0 and detail["progress"]["data"] == {"step": "done"}
    assert detail["progress"]["updated_at"] is not None
    assert detail["result"] == {"sum": 5} and detail["error"] is None
    listed = api.get("/api/jobs/").json()["results"][0]
    assert listed["progress"] == {"processed": 2, "total": 2, "percent": 100.0}

    # A finished job cannot be cancelled, nor retried after a success.
    assert api.delete(f"/api/jobs/{job_id}/").status_code == 409
    assert api.post(f"/api/jobs/{job_id}/retry/").status_code == 409

    # Past its retention, the result is no longer shown.
    JobInfo.objects.filter(job_id=job_id).update(result_expires_at=timezone.now() - timedelta(seconds=1))
    assert api.get(f"/api/jobs/{job_id}/").json()["result"] is None


@pytest.mark.django_db(transaction=True)
def test_cancel_a_waiting_job_then_409():
    owner = make_user("fay")
    api = client_for(owner)
    job_id = job_defer(add, owner_id=owner.id, a=1, b=1)
    assert api.delete(f"/api/jobs/{job_id}/").status_code == 204
    assert _status(job_id) == "cancelled"
    again = api.delete(f"/api/jobs/{job_id}/")
    assert again.status_code == 409 and again.json()["detail"]
    run_worker(queues=["imports"])
    assert _status(job_id) == "cancelled"  # a worker never runs it
    assert [e["type"] for e in api.get(f"/api/jobs/{job_id}/").json()["timeline"]] == ["deferred", "cancelled"]


@pytest.mark.django_db(transaction=True)
def test_cancel_of_a_running_job_is_409():
    owner = make_user("gus")
    job_id = job_defer(add, owner_id=owner.id, a=1, b=1)
    with connection.cursor() as cursor:  # a worker has taken it (what the fetch does)
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", [job_id])
    assert client_for(owner).delete(f"/api/jobs/{job_id}/").status_code == 409
    assert _status(job_id) == "doing"


@pytest.mark.django_db(transaction=True)
def test_retry_of_a_failed_job_then_a_worker_finishes_it():
    owner = make_user("hal")
    api = client_for(owner)
    FLAKY["failures_left"] = 1
    job_id = job_defer(flaky, owner_id=owner.id, n=7)
    assert api.post(f"/api/jobs/{job_id}/retry/").status_code == 409  # not failed yet
    run_worker(queues=["imports"])
    failed = api.get(f"/api/jobs/{job_id}/").json()
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: the flaky task failed"

    retried = api.post(f"/api/jobs/{job_id}/retry/")
    assert retried.status_code == 202 and retried.json()["status"] == "todo"
    assert api.post(f"/api/jobs/{job_id}/retry/").status_code == 409  # already waiting
    run_worker(queues=["imports"])

    done = api.get(f"/api/jobs/{job_id}/").json()
    assert done["status"] == "succeeded" and done["result"] == 7 and done["error"] is None
    assert [e["type"] for e in done["timeline"]] == ["deferred", "started", "failed", "retried", "started", "succeeded"]


# --- staff permissions ---------------------------------------------------------------------
@pytest.mark.django_db
def test_staff_need_the_permission_to_act_on_other_users_jobs(api, user):
    job_id = job_defer(add, owner_id=user.id, a=1, b=1)
    plain_staff = client_for(_staff("sam"))
    assert plain_staff.get(f"/api/jobs/{job_id}/").status_code == 200  # staff see everything
    assert plain_staff.delete(f"/api/jobs/{job_id}/").status_code == 403
    assert plain_staff.post(f"/api/jobs/{job_id}/retry/").status_code == 403
    assert _status(job_id) == "todo"

    # The permission without is_staff is not enough: the job is not even visible.
    not_staff = make_user("pat")
    not_staff.user_permissions.add(Permission.objects.get(codename="cancel_job"))
    assert client_for(not_staff).delete(f"/api/jobs/{job_id}/").status_code == 404

    retrier = client_for(_staff("rex", "retry_job"))
    assert retrier.delete(f"/api/jobs/{job_id}/").status_code == 403
    assert retrier.post(f"/api/jobs/{job_id}/retry/").status_code == 409  # allowed, but it has not failed

    canceller = client_for(_staff("cat", "cancel_job"))
    assert canceller.delete(f"/api/jobs/{job_id}/").status_code == 204
    assert _status(job_id) == "cancelled"

    # Jobs without an owner belong to nobody: the permission is needed too.
    ownerless = add.defer(a=0, b=0)
    assert plain_staff.delete(f"/api/jobs/{ownerless}/").status_code == 403
    superuser = client_for(make_user("root", is_staff=True, is_superuser=True))
    assert superuser.delete(f"/api/jobs/{ownerless}/").status_code == 204

    # Staff acting on their own job need no permission; owners need none either.
    staff_user = _staff("own")
    own = job_defer(add, owner_id=staff_user.id, a=1, b=1)
    assert client_for(staff_user).delete(f"/api/jobs/{own}/").status_code == 204
    mine = job_defer(add, owner_id=user.id, a=1, b=1)
    assert api.delete(f"/api/jobs/{mine}/").status_code == 204


# --- queues --------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_pause_and_resume_a_queue_through_the_api():
    owner = make_user("ivy")
    user_api = client_for(owner)
    assert user_api.get("/api/jobs/queues/").status_code == 403
    assert user_api.post("/api/jobs/queues/imports/pause/").status_code == 403
    viewer = client_for(_staff("vic"))
    assert viewer.get("/api/jobs/queues/").status_code == 200
    assert viewer.post("/api/jobs/queues/imports/pause/").status_code == 403

    operator = client_for(_staff("ops", "pause_queue"))
    paused = operator.post("/api/jobs/queues/imports/pause/")
    assert paused.status_code == 200
    assert paused.json()["name"] == "imports" and paused.json()["paused"] and paused.json()["paused_at"]
    unknown = operator.post("/api/jobs/queues/nope/pause/")
    assert unknown.status_code == 400 and "queue" in unknown.json()
    assert operator.post("/api/jobs/queues/nope/resume/").status_code == 400

    job_id = job_defer(add, owner_id=owner.id, a=1, b=1)
    run_worker(queues=["imports"])
    assert _status(job_id) == "todo"  # the worker skipped the paused queue
    listed = {q["name"]: q for q in operator.get("/api/jobs/queues/").json()}
    assert set(queues.ALL) <= set(listed)
    assert listed["imports"]["paused"] and listed["imports"]["counts"]["todo"] == 1
    assert not listed["notifications"]["paused"] and listed["notifications"]["paused_at"] is None

    resumed = operator.post("/api/jobs/queues/imports/resume/")
    assert resumed.status_code == 200 and not resumed.json()["paused"]
    run_worker(queues=["imports"])
    assert _status(job_id) == "succeeded"
    assert operator.get("/api/jobs/queues/").json()[list(queues.ALL).index("imports")]["counts"]["succeeded"] == 1


@pytest.mark.django_db
def test_the_openapi_schema_still_renders(api):
    response = api.get("/api/schema/")
    assert response.status_code == 200
    assert b"/api/jobs/{id}/stream/" in response.content and b"/api/jobs/metrics/" in response.content


def test_a_job_shows_its_concurrency_limit(api, user):
    from jobs.tasking.defer import job_defer
    from tests.jobs import tasks_for_tests as tasks

    limited = job_defer(tasks.limited_slots, owner_id=user.pk, group="a")
    plain = job_defer(tasks.echo, owner_id=user.pk, value=1)

    assert api.get(f"/api/jobs/{limited}/").json()["concurrency"] == {
        "key": "group:a",
        "limit": tasks.CONCURRENCY,
        "running": 0,
    }
    assert api.get(f"/api/jobs/{plain}/").json()["concurrency"] is None
