"""Tier-2 enrichment end to end: real worker, real anthropic SDK, a Messages API peer on 127.0.0.1."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone
from procrastinate.contrib.django import app

from llm.models import LlmUsage
from notes import services
from notes.enrichment import parse_answer
from notes.models import Note
from tests.complexity import assert_linear_on_hostile_text
from tests.factories import make_user
from tests.helpers import jobs as all_jobs
from tests.helpers import run_worker, wait_for
from tests.jobs.workers import retry_delay

pytestmark = pytest.mark.django_db(transaction=True)


def jobs() -> list[dict]:
    return all_jobs("notes.enrich")


@pytest.fixture
def owner(transactional_db):
    return make_user("carol")


def _fast_forward(job_id: int) -> None:
    """Make a job scheduled for later runnable now."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE id = %s", [job_id])


def test_enrichment_stores_claude_results_and_ledger(owner, claude):
    older = services.note_create(owner=owner, content="Notes on PostgreSQL vacuum")
    stranger = services.note_create(owner=make_user("mallory"), content="Someone else's note")
    note = services.note_create(owner=owner, content="SKIP LOCKED makes a fine job queue #postgres")
    claude.answer_json(
        {"type": "reference", "tags": ["Databases", "#queues"], "summary": "Queues in PG.", "connections": []}
    )  # for `older`
    claude.answer_json({"type": "note", "tags": [], "summary": "Not mine.", "connections": []})
    claude.answer_json(
        {
            "type": "idea",
            "tags": ["postgres", "Queues"],
            "summary": "  Using   SKIP LOCKED for a queue. ",
            "connections": [older.id, stranger.id, 999999, "x"],
        },
        input_tokens=1200,
        output_tokens=300,
    )

    run_worker()

    note.refresh_from_db()
    assert note.enrichment_status == "done"
    assert note.enriched_at is not None
    assert note.ai_type == "idea" and note.note_type == "idea"
    assert note.ai_tags == ["postgres", "queues"]
    assert note.tags == ["postgres"]  # Tier-1 data is kept
    assert note.summary == "Using SKIP LOCKED for a queue."
    assert note.connections == [older.id]  # only the owner's notes that were offered
    last = claude.message_requests[-1]
    headers = last["headers"]
    assert "sk-ant-test-key" in (headers.get("x-api-key", "") + headers.get("authorization", ""))
    assert last["body"]["model"] == "claude-haiku-4-5"
    assert "SKIP LOCKED" in last["body"]["messages"][0]["content"]
    assert f"id {older.id}:" in last["body"]["messages"][0]["content"]
    assert "Someone else" not in last["body"]["messages"][0]["content"]

    usage = LlmUsage.objects.filter(owner=owner).order_by("id").last()
    assert (usage.input_tokens, usage.output_tokens, usage.model) == (1200, 300, "claude-haiku-4-5")
    assert usage.cost_usd == Decimal("0.002700")  # 1200 * $1/MTok + 300 * $5/MTok
    assert LlmUsage.objects.count() == 3
    assert {j["status"] for j in jobs()} == {"succeeded"}


def test_without_an_api_key_enrichment_is_skipped_and_nothing_is_called(owner, settings, claude):
    settings.ANTHROPIC_API_KEY = ""
    note = services.note_create(owner=owner, content="works offline")
    run_worker()
    note.refresh_from_db()
    assert note.enrichment_status == "skipped"
    assert "ANTHROPIC_API_KEY" in note.enrichment_error
    assert claude.requests == []
    assert jobs()[0]["status"] == "succeeded"


def test_over_budget_the_call_is_not_made_and_the_note_is_skipped(owner, settings, claude):
    settings.LLM_MONTHLY_BUDGET_USD = 0.01
    LlmUsage.objects.create(
        purpose="note_enrichment", model="claude-haiku-4-5", input_tokens=1, output_tokens=1, cost_usd="0.011"
    )
    note = services.note_create(owner=owner, content="too expensive")
    run_worker()
    note.refresh_from_db()
    assert note.enrichment_status == "skipped"
    assert "budget" in note.enrichment_error
    assert claude.requests == []


def test_last_month_spend_does_not_count_against_this_month(owner, settings, claude):
    settings.LLM_MONTHLY_BUDGET_USD = 0.01
    old = LlmUsage.objects.create(
        purpose="note_enrichment", model="claude-haiku-4-5", input_tokens=1, output_tokens=1, cost_usd="5"
    )
    LlmUsage.objects.filter(id=old.id).update(created_at=timezone.now() - timedelta(days=40))
    note = services.note_create(owner=owner, content="fine this month")
    run_worker()
    note.refresh_from_db()
    assert note.enrichment_status == "done"


def test_budget_is_spent_by_calls_until_exhausted(owner, settings, claude):
    # Each call costs 100*$1 + 50*$5 per MTok = $0.00035; a budget of $0.0005 allows two calls.
    settings.LLM_MONTHLY_BUDGET_USD = 0.0005
    notes = [services.note_create(owner=owner, content=f"note {i}") for i in range(3)]
    run_worker()
    statuses = [Note.objects.get(id=n.id).enrichment_status for n in notes]
    assert statuses == ["done", "done", "skipped"]
    assert len(claude.message_requests) == 2


@pytest.mark.parametrize("status", [429, 500, 529])
def test_transient_errors_are_retried_with_exponential_backoff(owner, claude, status):
    claude.fail(status, times=3)
    note = services.note_create(owner=owner, content="flaky provider")
    [job] = jobs()

    delays = []
    for _ in range(3):
        run_worker()
        assert Note.objects.get(id=note.id).enrichment_status == "pending"
        assert jobs()[0]["status"] == "todo"
        delays.append(retry_delay(job["id"]))
        _fast_forward(job["id"])
    run_worker()

    assert [round(d) for d in delays] == [2, 4, 8]
    note.refresh_from_db()
    assert note.enrichment_status == "done"
    assert len(claude.message_requests) == 4
    assert jobs()[0]["status"] == "succeeded"
    assert jobs()[0]["attempts"] == 4


def test_after_the_last_transient_failure_the_note_is_failed_and_an_operator_can_retry(owner, claude):
    claude.fail(529, times=4)
    note = services.note_create(owner=owner, content="provider down all day #kept")
    [job] = jobs()
    for _ in range(3):
        run_worker()
        _fast_forward(job["id"])
    run_worker()

    note.refresh_from_db()
    assert note.enrichment_status == "failed"
    assert "529" in note.enrichment_error
    assert note.tags == ["kept"] and note.word_count == 5  # Tier-1 data survives
    assert jobs()[0]["status"] == "failed"
    assert len(claude.message_requests) == 4

    # The operator's Retry (the admin action calls the same job-manager method).
    app.job_manager.retry_job_by_id(job["id"], timezone.now())
    run_worker()
    note.refresh_from_db()
    assert note.enrichment_status == "done"
    assert jobs()[0]["status"] == "succeeded"


@pytest.mark.parametrize("status", [400, 401])
def test_permanent_errors_are_not_retried(owner, claude, status):
    claude.fail(status)
    note = services.note_create(owner=owner, content="bad request")
    run_worker()
    note.refresh_from_db()
    assert note.enrichment_status == "failed"
    assert str(status) in note.enrichment_error
    assert len(claude.message_requests) == 1
    assert jobs()[0]["status"] == "failed"
    assert jobs()[0]["scheduled_at"] is None or jobs()[0]["attempts"] == 1


def test_unparseable_output_is_retried_then_fails(owner, claude):
    for _ in range(4):
        claude.answer_text("Sure! Here are some tags: postgres, queues")
    note = services.note_create(owner=owner, content="chatty model")
    [job] = jobs()
    for _ in range(3):
        run_worker()
        _fast_forward(job["id"])
    run_worker()
    note.refresh_from_db()
    assert note.enrichment_status == "failed"
    assert "unparseable" in note.enrichment_error
    assert len(claude.message_requests) == 4
    assert LlmUsage.objects.count() == 4  # tokens were spent on every answer


def test_a_waiting_job_enriches_the_latest_content(owner, claude):
    note = services.note_create(owner=owner, content="version one")
    services.note_update(note=note, content="version two")  # joins the waiting job
    run_worker()
    assert len(claude.message_requests) == 1
    assert "version two" in claude.message_requests[0]["body"]["messages"][0]["content"]
    assert Note.objects.get(id=note.id).enrichment_status == "done"


def test_an_answer_for_old_content_does_not_overwrite_a_newer_edit(owner, claude):
    note = services.note_create(owner=owner, content="version one")
    release = threading.Event()
    claude.hang(release)
    outcome = {}

    def enrich_in_background() -> None:
        try:
            outcome["status"] = services.note_enrich(note_id=note.id)
        finally:
            connection.close()

    thread = threading.Thread(target=enrich_in_background)
    thread.start()
    assert claude.request_started.wait(5)
    services.note_update(note=Note.objects.get(id=note.id), content="edited while Claude was thinking")
    release.set()
    thread.join(10)

    assert outcome["status"] == "superseded"
    note.refresh_from_db()
    assert note.enrichment_status == "pending" and note.summary == ""
    assert [j["status"] for j in jobs()] == ["todo"]  # still waiting: it will enrich the edit


def test_deleted_note_job_finishes_quietly(owner, claude):
    note = services.note_create(owner=owner, content="gone soon")
    note.delete()
    run_worker()
    assert claude.requests == []
    assert jobs()[0]["status"] == "succeeded"


def test_reading_an_answer_is_linear_in_its_size():
    """`\\{.*\\}` rescanned the rest of the answer from every "{": a megabyte of "{" (a hostile
    or broken endpoint at ANTHROPIC_BASE_URL) took minutes."""
    assert_linear_on_hostile_text(
        "from notes.enrichment import parse_answer", "parse_answer(text, candidate_ids={1})", size=1_000_000
    )


@pytest.mark.parametrize(
    ("answer", "summary"),
    [
        ('Sure! {"type": "idea", "summary": "s {x}", "tags": [], "connections": []} Hope it helps {:', "s {x}"),
        ('}{"type": "idea", "summary": "t"}', "t"),
    ],
)
def test_the_json_object_is_taken_from_the_first_brace_to_the_last(answer, summary):
    assert parse_answer(answer, candidate_ids=set()).summary == summary


def test_one_users_enrichments_take_at_most_their_share_of_the_claude_slots(owner, claude, settings):
    # notes.enrich runs at most LLM_CONCURRENCY_PER_USER (2) calls per user at once: with four
    # worker slots and four of carol's notes waiting, dave's note still gets a slot, and carol's
    # other two wait queued (no attempt spent) instead of taking the last two slots.
    release = threading.Event()
    for _ in range(5):
        claude.hang(release)
    carols = [services.note_create(owner=owner, content=f"carol's note {n}") for n in range(4)]
    daves = services.note_create(owner=make_user("dave"), content="dave's only note")
    worker = threading.Thread(target=run_worker, kwargs={"queues": ["enrichment"], "concurrency": 4})
    worker.start()
    try:
        wait_for(lambda: len(claude.message_requests) == 3, timeout=30, what="three calls in flight")
        processing = Note.objects.filter(enrichment_status="processing")
        assert sorted(processing.values_list("owner_id", flat=True)) == sorted([owner.id, owner.id, daves.owner_id])
        waiting = [job for job in jobs() if job["status"] == "todo"]
        assert len(waiting) == 2 and {job["attempts"] for job in waiting} == {0}
    finally:
        release.set()
        worker.join(60)
    ended = Note.objects.filter(id__in=[n.id for n in [*carols, daves]]).values_list("enrichment_status", flat=True)
    assert set(ended) == {"done"}
    assert {job["args"]["note_id"] for job in jobs()} == {n.id for n in [*carols, daves]}
