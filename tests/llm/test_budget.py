"""The LLM budget per user and day (LLM_DAILY_BUDGET_USD_PER_USER), and calls that time out
after they were sent: real worker, real anthropic SDK, the Messages API peer on 127.0.0.1."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connection

from core.errors import ProviderError
from llm.models import LlmUsage
from llm.services import LlmUnavailable, llm_complete
from notes import services as note_services
from notes.models import Note
from tests.factories import make_user
from tests.helpers import jobs, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_over_the_daily_budget_per_user_enrichment_falls_back_to_tier1(settings, claude):
    # Each answer costs 1000 * $1 + 500 * $5 per MTok = $0.0035. A call first reserves its worst
    # case (the prompt's estimated tokens and all 512 output tokens, about $0.0027), so a budget
    # of $0.005 has room for one call and not for a second.
    settings.LLM_DAILY_BUDGET_USD_PER_USER = 0.005
    claude.default.input_tokens, claude.default.output_tokens = 1000, 500
    owner, other = make_user("ursula"), make_user("victor")
    first = note_services.note_create(owner=owner, content="first note #kept")
    run_worker()
    second = note_services.note_create(owner=owner, content="second note #kept")
    others = note_services.note_create(owner=other, content="another user's note")

    run_worker()

    assert Note.objects.get(id=first.id).enrichment_status == "done"
    second.refresh_from_db()
    assert second.enrichment_status == "skipped"
    assert "daily LLM budget" in second.enrichment_error
    assert second.tags == ["kept"] and second.word_count == 3  # Tier-1 stays
    assert Note.objects.get(id=others.id).enrichment_status == "done"  # a budget per user
    assert len(claude.message_requests) == 2
    assert {j["status"] for j in jobs("notes.enrich")} == {"succeeded"}


def test_a_call_in_flight_holds_its_share_so_a_parallel_call_cannot_pass_the_budget(settings, claude):
    settings.LLM_DAILY_BUDGET_USD_PER_USER = 0.004  # room for one call's reservation (about $0.0027)
    owner = make_user("wanda")
    release = threading.Event()
    claude.hang(release)
    outcome: dict[str, object] = {}

    def first_call() -> None:
        try:
            outcome["first"] = llm_complete(purpose="test", system="s", prompt="p", owner_id=owner.id, max_tokens=512)
        finally:
            connection.close()

    thread = threading.Thread(target=first_call)
    thread.start()
    try:
        assert claude.request_started.wait(10)
        with pytest.raises(LlmUnavailable, match="daily LLM budget"):
            llm_complete(purpose="test", system="s", prompt="p", owner_id=owner.id, max_tokens=512)
    finally:
        release.set()
        thread.join(20)

    assert outcome["first"].text  # the first call was answered
    assert len(claude.message_requests) == 1
    assert LlmUsage.objects.filter(owner=owner).count() == 1


def test_a_call_that_times_out_after_it_was_sent_is_in_the_ledger_as_estimated(settings, claude):
    settings.ANTHROPIC_TIMEOUT_SECONDS = 0.5
    owner = make_user("xena")
    release = threading.Event()
    claude.hang(release)
    try:
        with pytest.raises(ProviderError) as raised:
            llm_complete(purpose="test", system="You answer.", prompt="x" * 3000, owner_id=owner.id, max_tokens=400)
    finally:
        release.set()

    assert raised.value.permanent is False  # retried by the job layer, as before
    [usage] = LlmUsage.objects.filter(owner=owner)
    assert usage.estimated is True
    assert usage.output_tokens == 400  # the most it could have produced
    assert usage.input_tokens >= 3000 // 4  # estimated from the request, never under a real count
    assert usage.cost_usd == Decimal(usage.input_tokens + 5 * 400) / 1_000_000
    assert usage.purpose == "test" and usage.model == "claude-haiku-4-5"


def test_an_enrichment_that_times_out_is_billed_in_the_ledger_and_retried(settings, claude):
    settings.ANTHROPIC_TIMEOUT_SECONDS = 0.5
    owner = make_user("yuri")
    release = threading.Event()
    claude.hang(release)
    note = note_services.note_create(owner=owner, content="the answer comes too late")
    try:
        run_worker()
    finally:
        release.set()

    [usage] = LlmUsage.objects.filter(owner=owner)
    assert usage.estimated and usage.output_tokens == 512 and usage.cost_usd > 0
    assert usage.purpose == "note_enrichment"
    assert Note.objects.get(id=note.id).enrichment_status == "pending"  # a retry follows
    assert jobs("notes.enrich")[0]["status"] == "todo"


def test_a_refused_call_gives_its_reservation_back(settings, claude):
    settings.LLM_DAILY_BUDGET_USD_PER_USER = 0.004  # one reservation at a time
    owner = make_user("zoe")
    claude.fail(400)
    with pytest.raises(ProviderError):
        llm_complete(purpose="test", system="s", prompt="p", owner_id=owner.id, max_tokens=512)
    llm_complete(purpose="test", system="s", prompt="p", owner_id=owner.id, max_tokens=512)  # fits again
    assert len(claude.message_requests) == 2
