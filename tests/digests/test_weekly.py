"""The weekly secondbrain digest through a real worker and the local Messages API server."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection

from digests import services
from digests.models import WeeklyDigest
from llm.models import LlmUsage
from notes import services as note_services
from notes.models import Note
from tests.factories import make_user
from tests.helpers import jobs, run_worker

pytestmark = pytest.mark.django_db(transaction=True)

FRIDAY = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


def _notes_last_week(owner, *contents):
    for content in contents:
        note = note_services.note_create(owner=owner, content=content)
        Note.objects.filter(id=note.id).update(created_at=FRIDAY - timedelta(days=2))


def _fast_forward() -> None:
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo'")


def test_fanout_defers_one_job_per_active_user_never_two_waiting():
    alice, bob = make_user("alice2"), make_user("bob2")
    make_user("gone", is_active=False)
    assert services.weekly_digest_fanout(period_end=FRIDAY) == 2
    assert services.weekly_digest_fanout(period_end=FRIDAY) == 0  # still waiting: not again
    waiting = jobs("digests.weekly_digest")
    assert sorted(j["args"]["user_id"] for j in waiting) == sorted([alice.id, bob.id])
    assert {j["queue_name"] for j in waiting} == {"digests"}
    assert {j["queueing_lock"] for j in waiting} == {f"weekly-digest:{alice.id}", f"weekly-digest:{bob.id}"}
    # The user's Claude slots, shared with their note enrichments (notes.enrich).
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT jobs_concurrency_key, jobs_concurrency_limit FROM procrastinate_jobs"
            " WHERE task_name = 'digests.weekly_digest' ORDER BY jobs_concurrency_key"
        )
        assert cursor.fetchall() == sorted([(f"llm:user:{alice.id}", 2), (f"llm:user:{bob.id}", 2)])


def test_the_weekly_digest_is_written_by_claude_and_accounted(claude):
    owner = make_user("carl")
    _notes_last_week(owner, "Decided on PostgreSQL for the queue #infra", "Question: how to vacuum?")
    old = note_services.note_create(owner=owner, content="Too old for this digest")
    Note.objects.filter(id=old.id).update(created_at=FRIDAY - timedelta(days=9))
    claude.default.text = "This week you chose PostgreSQL and wondered about VACUUM."
    services.weekly_digest_fanout(period_end=FRIDAY)
    run_worker(queues=["digests"])

    digest = WeeklyDigest.objects.get(owner=owner)
    assert digest.ai_generated and digest.content == "This week you chose PostgreSQL and wondered about VACUUM."
    assert (digest.period_start, digest.period_end, digest.note_count) == (FRIDAY - timedelta(days=7), FRIDAY, 2)
    assert digest.cost_usd == Decimal("0.000350")
    prompt = claude.message_requests[-1]["body"]["messages"][0]["content"]
    assert "PostgreSQL for the queue" in prompt and "Too old" not in prompt
    assert LlmUsage.objects.filter(purpose="weekly_digest", owner=owner).count() == 1


@pytest.mark.parametrize("situation", ["no_key", "over_budget"])
def test_without_ai_a_plain_digest_is_written_never_nothing(claude, settings, situation):
    if situation == "no_key":
        settings.ANTHROPIC_API_KEY = ""
    else:
        settings.LLM_MONTHLY_BUDGET_USD = 0.001
        LlmUsage.objects.create(purpose="x", model="claude-haiku-4-5", input_tokens=1, output_tokens=1, cost_usd="1")
    owner = make_user("dina")
    _notes_last_week(owner, "Plan the #garden", "Buy seeds #garden #shopping")
    digest = services.weekly_digest_generate(user_id=owner.id, period_end=FRIDAY)
    assert not digest.ai_generated and digest.fallback_reason
    assert "2 notes this week." in digest.content and "#garden (2)" in digest.content
    assert "- Plan the #garden" in digest.content
    assert claude.message_requests == []


def test_provider_failures_retry_then_fall_back_to_the_plain_digest(claude):
    owner = make_user("eli")
    _notes_last_week(owner, "something")
    claude.fail(529, times=4)
    services.weekly_digest_fanout(period_end=FRIDAY)
    for _ in range(4):
        run_worker(queues=["digests"])
        _fast_forward()
    digest = WeeklyDigest.objects.get(owner=owner)
    assert not digest.ai_generated and "AI failed" in digest.fallback_reason
    assert len(claude.message_requests) == 4
    assert jobs("digests.weekly_digest")[0]["status"] == "succeeded"


def test_past_its_time_limit_the_job_fails_and_is_retried_not_left_running(claude, settings):
    settings.DIGEST_TIME_LIMIT_SECONDS = 1
    owner = make_user("fay")
    _notes_last_week(owner, "slow week")
    release = threading.Event()
    claude.hang(release)
    services.weekly_digest_fanout(period_end=FRIDAY)
    try:
        run_worker(queues=["digests"])
        [job] = jobs("digests.weekly_digest")
        assert job["status"] == "todo" and job["attempts"] == 1  # failed at the limit, retry scheduled
        with connection.cursor() as cursor:
            cursor.execute("SELECT type FROM procrastinate_events WHERE job_id = %s ORDER BY id", [job["id"]])
            assert "deferred_for_retry" in [t for (t,) in cursor.fetchall()]
    finally:
        release.set()
    _fast_forward()
    run_worker(queues=["digests"])
    assert WeeklyDigest.objects.filter(owner=owner).count() == 1  # the late first run and the retry: one digest


def test_past_its_time_limit_on_the_last_attempt_the_plain_digest_is_written(claude, settings):
    settings.DIGEST_TIME_LIMIT_SECONDS = 0.5
    # A sync job's code runs on past its limit until the call returns; keep that short.
    settings.ANTHROPIC_TIMEOUT_SECONDS = 1.5
    owner = make_user("gus")
    _notes_last_week(owner, "a slow week again")
    release = threading.Event()
    for _ in range(4):  # the first run and its 3 retries
        claude.hang(release)
    services.weekly_digest_fanout(period_end=FRIDAY)
    try:
        for _ in range(4):
            run_worker(queues=["digests"])
            _fast_forward()
    finally:
        release.set()
    [job] = jobs("digests.weekly_digest")
    # Succeeded: the last attempt wrote the plain digest at its limit instead of failing.
    assert (job["status"], job["attempts"]) == ("succeeded", 4)
    digest = WeeklyDigest.objects.get(owner=owner)
    assert not digest.ai_generated and digest.fallback_reason.startswith("AI failed:")
    assert "- a slow week again" in digest.content


def test_the_fanout_is_a_batch_whose_callback_records_the_run(claude):
    ai, plain = make_user("fay"), make_user("gus")
    _notes_last_week(ai, "Chose PostgreSQL #infra")  # gus has no notes: the plain digest
    claude.default.text = "You chose PostgreSQL."
    assert services.weekly_digest_fanout(period_end=FRIDAY) == 2
    assert jobs("digests.weekly_run_record") == []  # not before the last digest has ended

    run_worker(queues=["digests"])
    run_worker(queues=["digests"])  # the callback, deferred by the last digest's end

    [record] = jobs("digests.weekly_run_record")
    assert record["status"] == "succeeded"
    assert {k: record["args"][k] for k in ("total", "succeeded", "failed")} == {"total": 2, "succeeded": 2, "failed": 0}
    with connection.cursor() as cursor:
        cursor.execute("SELECT result FROM jobs_job_info WHERE job_id = %s", [record["id"]])
        result = cursor.fetchone()[0]
    result = json.loads(result) if isinstance(result, str) else result
    assert result == {
        "period_end": FRIDAY.isoformat(),
        "users": 2,
        "digests": 2,
        "plain": 1,
        "failed": 0,
        "cancelled": 0,
    }
    assert WeeklyDigest.objects.get(owner=plain).ai_generated is False
