"""The jobs API shows batches (progress, members, callbacks) and a job's parents, children and
batch; a batch can be cancelled or its failed members retried as a whole (issue 13)."""

from __future__ import annotations

import pytest

from jobs.tasking.defer import job_defer
from jobs.tasking.workflows import job_batch, job_call
from tests.factories import make_user
from tests.helpers import client_for, run_worker
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_status

pytestmark = pytest.mark.django_db(transaction=True)


def _batch_of(owner, tmp_path):
    with job_batch(on_complete=job_call(tasks.batch_report), owner_id=owner.id, name="nightly") as batch:
        ok = job_defer(tasks.echo, owner_id=owner.id, value=1)
        failing = job_defer(tasks.fail_unless_file, owner_id=owner.id, path=str(tmp_path / "fixed"))
    return batch.id, ok, failing


def test_a_batch_shows_its_progress_members_and_callbacks_to_its_owner_only(tmp_path):
    owner, other = make_user("ana"), make_user("bo")
    batch_id, ok, failing = _batch_of(owner, tmp_path)
    api = client_for(owner)

    body = api.get(f"/api/jobs/batches/{batch_id}/").json()
    assert (body["name"], body["state"], body["total"], body["done"], body["percent"]) == ("nightly", "sealed", 2, 0, 0)
    assert body["members_by_status"] == {"todo": 2}
    assert [m["id"] for m in body["members"]] == [ok, failing]

    run_worker(queues=[tasks.QUEUE_A])
    body = api.get(f"/api/jobs/batches/{batch_id}/").json()
    assert (body["state"], body["succeeded"], body["failed"], body["percent"]) == ("done", 1, 1, 100.0)
    assert body["callbacks"] == ["on_complete"] and len(body["callback_job_ids"]) == 1
    assert [b["id"] for b in api.get("/api/jobs/batches/").json()["results"]] == [batch_id]

    assert client_for(other).get(f"/api/jobs/batches/{batch_id}/").status_code == 404
    assert client_for(other).get("/api/jobs/batches/").json()["results"] == []
    assert client_for(other).post(f"/api/jobs/batches/{batch_id}/cancel/").status_code == 404


def test_a_jobs_detail_shows_its_batch_parents_and_children():
    owner = make_user("ana")
    with job_batch(owner_id=owner.id) as batch:
        parent = job_defer(tasks.echo, owner_id=owner.id, value=1)
    child = job_defer(tasks.parent_results, owner_id=owner.id, after=[parent], on_parent_failure="run")
    api = client_for(owner)

    body = api.get(f"/api/jobs/{child}/").json()
    assert (body["batch_id"], body["parents_waiting"], body["children"]) == (None, 1, [])
    assert body["parents"] == [
        {"id": parent, "task": "tests.echo", "status": "todo", "dependency": "waiting", "on_parent_failure": "run"}
    ]
    body = api.get(f"/api/jobs/{parent}/").json()
    assert body["batch_id"] == batch.id
    assert body["children"] == [{"id": child, "task": "tests.parent_results", "status": "todo"}]


def test_cancelling_a_batch_cancels_its_waiting_members_and_completes_it(tmp_path):
    owner = make_user("ana")
    batch_id, ok, failing = _batch_of(owner, tmp_path)

    body = client_for(owner).post(f"/api/jobs/batches/{batch_id}/cancel/").json()

    assert (body["state"], body["cancelled"]) == ("done", 2)
    assert [job_status(ok), job_status(failing)] == ["cancelled", "cancelled"]
    [callback] = body["callback_job_ids"]
    assert client_for(owner).get(f"/api/jobs/{callback}/").json()["args"]["cancelled"] == 2


def test_retrying_a_batch_retries_its_failed_members_only(tmp_path):
    owner = make_user("ana")
    batch_id, ok, failing = _batch_of(owner, tmp_path)
    run_worker(queues=[tasks.QUEUE_A])
    (tmp_path / "fixed").write_text("")

    response = client_for(owner).post(f"/api/jobs/batches/{batch_id}/retry/")

    assert response.status_code == 202 and response.json() == {"retried": [failing], "refused": []}
    assert [job_status(ok), job_status(failing)] == ["succeeded", "todo"]
    run_worker(queues=[tasks.QUEUE_A])
    body = client_for(owner).get(f"/api/jobs/batches/{batch_id}/").json()
    assert (body["state"], body["succeeded"], body["failed"], body["completions"]) == ("done", 2, 0, 2)


def test_the_jobs_list_shows_each_jobs_batch_and_blocked_state_and_filters_by_them():
    """A batch's detail shows its first members; the list reaches all of them (`?batch=`), and
    tells jobs blocked by their parents (`?status=blocked`) from jobs a worker may take."""
    owner = make_user("ana")
    with job_batch(owner_id=owner.id) as batch:
        members = [job_defer(tasks.echo, owner_id=owner.id, value=n) for n in range(3)]
    child = job_defer(tasks.parent_results, owner_id=owner.id, after=[members[0]])
    loose = job_defer(tasks.echo, owner_id=owner.id, value=9)
    api = client_for(owner)

    def listed(query: str) -> dict[int, dict]:
        response = api.get(f"/api/jobs/?{query}")
        assert response.status_code == 200, response.content
        return {job["id"]: job for job in response.json()["results"]}

    every = listed("")
    assert [every[m]["batch_id"] for m in members] == [batch.id] * 3
    assert (every[child]["batch_id"], every[child]["parents_waiting"]) == (None, 1)
    assert (every[loose]["batch_id"], every[loose]["parents_waiting"]) == (None, 0)
    assert sorted(listed(f"batch={batch.id}")) == members
    assert listed("batch=999999") == {}
    assert sorted(listed("status=blocked")) == [child]
    assert sorted(listed("status=waiting")) == [*members, loose]
    assert api.get("/api/jobs/?batch=x").status_code == 400
    assert client_for(make_user("bo")).get(f"/api/jobs/?batch={batch.id}").json()["results"] == []
