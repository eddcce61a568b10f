"""One clock: what workers on different hosts must agree on is decided by the database's clock.

Each test runs a real worker process whose own clock is minutes (or a month) off, with
libfaketime (tests/helpers.py: skewed_clock_env), against decisions made by the database's.
"""

from __future__ import annotations

from datetime import time

import pytest
from django.db import connection

from digests import services as digest_services
from digests.tasks import digest_sweep as digest_sweep_task
from jobs.tasking.breaker import breaker_record_failure, breaker_state
from jobs.tasking.defer import job_defer
from llm.models import LlmUsage
from notes import services as note_services
from notes.models import Note
from notifications import services as notification_services
from notifications.models import DeliveryLog, NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import skewed_clock_env, smtp_env, start_worker_process, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_events, job_status, query, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)

AHEAD, BEHIND = "+10m", "-10m"


def _seconds_from_db_now(sql_timestamp: str, params: list) -> float:
    """How far a stored time is from the database's now, in seconds (negative: in the past)."""
    return float(query(f"SELECT extract(epoch FROM ({sql_timestamp}) - now())", params)[0][0])


def _retry_wait(job_id: int) -> float:
    """The seconds between a job's last retry decision being written (its event's time, the
    database's clock) and the time it was scheduled for."""
    [(wait,)] = query(
        "SELECT extract(epoch FROM j.scheduled_at - e.at) FROM procrastinate_jobs AS j"
        " JOIN LATERAL (SELECT max(at) AS at FROM procrastinate_events"
        "               WHERE job_id = j.id AND type = 'deferred_for_retry') AS e ON true"
        " WHERE j.id = %s",
        [job_id],
    )
    return float(wait)


def _run_worker_until(condition, what: str, *args: str, env: dict[str, str], test_tasks: bool = False) -> str:
    """Start a worker process with `env`, wait for `condition`, stop it; returns its output."""
    worker = (start_test_worker if test_tasks else start_worker_process)(*args, env=env)
    try:
        wait_for(condition, timeout=90, what=what)  # a loaded machine starts workers slowly
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the worker said:\n{stop_worker(worker)}") from None
    return stop_worker(worker)


def _send(owner, recipient) -> NotificationJob:
    return notification_services.notification_send_email(
        owner=owner, recipient=recipient, subject="Hello", body="Hi", notification_type="system", priority="normal"
    )


# --- The circuit breaker ---------------------------------------------------------------------
def test_a_breaker_opened_by_one_worker_holds_for_a_worker_ten_minutes_ahead(smtp):
    owner = make_user("ahead")
    notification = _send(owner, make_recipient(owner))
    # Another worker saw the mail server fail: open for two minutes by the database's clock.
    breaker_record_failure(name=notification_services.EMAIL_BREAKER, threshold=1, cooldown_seconds=120)

    output = _run_worker_until(
        lambda: DeliveryLog.objects.filter(notification=notification).exists(),
        "a delivery attempt",
        "--queues",
        "notifications",
        env={**smtp_env(smtp), **skewed_clock_env(AHEAD)},
    )
    assert smtp.messages == [], output  # no probe: the cooldown is not over
    assert list(DeliveryLog.objects.filter(notification=notification).values_list("outcome", flat=True)) == [
        "postponed"
    ]
    assert breaker_state(name=notification_services.EMAIL_BREAKER)["state"] == "open"


def test_a_breaker_whose_cooldown_is_over_lets_a_worker_ten_minutes_behind_probe(smtp):
    owner = make_user("behind")
    notification = _send(owner, make_recipient(owner))
    breaker_record_failure(name=notification_services.EMAIL_BREAKER, threshold=1, cooldown_seconds=120)
    with connection.cursor() as cursor:  # the cooldown is over, by the database's clock
        cursor.execute("UPDATE jobs_circuit_breakers SET opened_until = now() - interval '1 second'")

    output = _run_worker_until(
        lambda: smtp.messages,
        "the probe's e-mail",
        "--queues",
        "notifications",
        env={**smtp_env(smtp), **skewed_clock_env(BEHIND)},
    )
    assert [m["Subject"] for m in smtp.messages] == ["Hello"], output
    notification.refresh_from_db()
    assert notification.status == "sent"
    assert breaker_state(name=notification_services.EMAIL_BREAKER)["state"] == "closed"


# --- Postponements and retries -----------------------------------------------------------------
def test_a_rate_limit_postponement_is_scheduled_by_the_database_clock():
    owner = make_user("limited")
    ids = [job_defer(tasks.limited_per_owner, owner_id=owner.id, n=n) for n in range(2)]  # 1 a minute

    def one_ran_one_postponed() -> int | None:
        done = [job_id for job_id in ids if job_status(job_id) == "succeeded"]
        postponed = [job_id for job_id in ids if "deferred_for_retry" in job_events(job_id)]
        return postponed[0] if len(done) == 1 and len(postponed) == 1 else None

    env = {"JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS": "0", **skewed_clock_env(AHEAD)}
    output = _run_worker_until(
        one_ran_one_postponed,
        "the second job postponed",
        "--queues",
        tasks.QUEUE_A,
        env=env,
        test_tasks=True,
    )
    wait = _retry_wait(one_ran_one_postponed())
    assert 55 < wait <= 61, output  # when the owner's next token is due, not ten minutes later


def test_a_retry_backoff_is_scheduled_by_the_database_clock():
    job_id = tasks.fail_transiently.defer(reason="the provider is down")  # retried after about 10 s

    output = _run_worker_until(
        lambda: "deferred_for_retry" in job_events(job_id),
        "the retry",
        "--queues",
        tasks.QUEUE_A,
        env=skewed_clock_env(BEHIND),
        test_tasks=True,
    )
    wait = _retry_wait(job_id)
    assert 0 < wait <= 15, output  # not ten minutes in the past (at once, again and again)


# --- The digest sweep ----------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [AHEAD, BEHIND])
def test_the_digest_sweep_of_a_skewed_worker_sends_what_is_due_by_the_database_clock(offset):
    owner = make_user("digested")
    due_to, later_to = make_recipient(owner, email="due@example.com"), make_recipient(owner, email="later@example.com")
    rule = {"frequency": "daily", "delivery_time": time(8, 0), "timezone": "UTC"}
    due = digest_services.recipient_digest_schedule_create(owner=owner, recipient=due_to, **rule)
    later = digest_services.recipient_digest_schedule_create(owner=owner, recipient=later_to, **rule)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE digest_schedules SET next_digest_scheduled = now() - interval '1 minute' WHERE id = %s", [due.id]
        )
        cursor.execute(
            "UPDATE digest_schedules SET next_digest_scheduled = now() + interval '5 minutes' WHERE id = %s", [later.id]
        )
    note_services.note_create(owner=owner, content="news")
    sweep = digest_sweep_task.defer()

    output = _run_worker_until(
        lambda: job_status(sweep) == "succeeded", "the sweep", "--queues", "digests", env=skewed_clock_env(offset)
    )
    sent_to = list(NotificationJob.objects.filter(notification_type="digest").values_list("recipient_id", flat=True))
    assert sent_to == [due_to.id], output  # due one minute ago; the other in five minutes
    sent_at = _seconds_from_db_now("SELECT last_digest_sent FROM digest_schedules WHERE id = %s", [due.id])
    assert -60 < sent_at <= 0


# --- The LLM budget's month ----------------------------------------------------------------------
def _enrichment_env(claude) -> dict[str, str]:
    return {
        "ANTHROPIC_API_KEY": "sk-ant-test-key",
        "ANTHROPIC_BASE_URL": claude.base_url,
        "LLM_MONTHLY_BUDGET_USD": "0.01",
    }


def _enriched(note_id: int) -> Note | None:
    """The note once its enrichment has ended (not while it is still `processing`)."""
    return Note.objects.filter(id=note_id).exclude(enrichment_status__in=["pending", "processing"]).first()


def test_a_worker_a_month_ahead_still_counts_this_months_spend(claude):
    LlmUsage.objects.create(purpose="x", model="claude-haiku-4-5", input_tokens=1, output_tokens=1, cost_usd="0.011")
    note = note_services.note_create(owner=make_user("spender"), content="too expensive")

    output = _run_worker_until(
        lambda: _enriched(note.id),
        "the enrichment",
        "--queues",
        "enrichment",
        env={**_enrichment_env(claude), **skewed_clock_env("+40d")},
    )
    enriched = _enriched(note.id)
    assert (enriched.enrichment_status, claude.requests) == ("skipped", []), output
    assert "budget" in enriched.enrichment_error


def test_a_worker_a_month_behind_does_not_count_last_months_spend(claude):
    old = LlmUsage.objects.create(purpose="x", model="claude-haiku-4-5", input_tokens=1, output_tokens=1, cost_usd="5")
    with connection.cursor() as cursor:  # the last day of the database's previous month
        cursor.execute(
            "UPDATE llm_usage SET created_at = date_trunc('month', now(), 'UTC') - interval '1 day' WHERE id = %s",
            [old.id],
        )
    note = note_services.note_create(owner=make_user("saver"), content="fine this month")

    output = _run_worker_until(
        lambda: _enriched(note.id),
        "the enrichment",
        "--queues",
        "enrichment",
        env={**_enrichment_env(claude), **skewed_clock_env("-40d")},
    )
    enriched = _enriched(note.id)
    assert enriched.enrichment_status == "done", output
    # The call is in the ledger at the database's time, so it counts in the database's month.
    [(at,)] = query("SELECT extract(epoch FROM created_at - now()) FROM llm_usage WHERE id <> %s", [old.id])
    assert -60 < float(at) <= 0
