from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction

from core.clock import db_now
from digests import schedule as rules
from digests.models import RecipientDigestSchedule, WeeklyDigest
from digests.selectors import digest_notes_horizon, notes_in_period, recipient_digest_schedules_unsent_notes
from jobs import job_batch, job_call, job_defer
from llm.services import LlmUnavailable, llm_complete
from notes.models import Note
from notifications.services import QueuedEmail, email_quota_fits, notifications_queue

logger = logging.getLogger(__name__)

SWEEP_BATCH = 500
WEEK = timedelta(days=7)


# --- Schedules -----------------------------------------------------------------------------
def _compute_next(schedule: RecipientDigestSchedule, *, now: datetime) -> datetime:
    return rules.next_run(
        frequency=schedule.frequency,
        delivery_time=schedule.delivery_time,
        delivery_day=schedule.delivery_day,
        timezone=schedule.timezone,
        after=now,
    )


@transaction.atomic
def recipient_digest_schedule_create(
    *, owner: AbstractBaseUser, now: datetime | None = None, **fields: Any
) -> RecipientDigestSchedule:
    schedule = RecipientDigestSchedule(owner=owner, **fields)
    schedule.next_digest_scheduled = _compute_next(schedule, now=now or db_now())
    schedule.save()
    return schedule


@transaction.atomic
def recipient_digest_schedule_update(
    *, schedule: RecipientDigestSchedule, now: datetime | None = None, **fields: Any
) -> RecipientDigestSchedule:
    for name, value in fields.items():
        setattr(schedule, name, value)
    if schedule.frequency == rules.DAILY:
        schedule.delivery_day = None
    schedule.next_digest_scheduled = _compute_next(schedule, now=now or db_now())
    schedule.save()
    return schedule


@transaction.atomic
def recipient_digest_schedule_delete(*, schedule: RecipientDigestSchedule) -> None:
    schedule.delete()


# --- The sweep -----------------------------------------------------------------------------
def _digest_body(notes: list[Note]) -> str:
    lines = [f"Your secondbrain digest: {len(notes)} new note{'s' if len(notes) != 1 else ''}.", ""]
    for note in notes:
        title = note.title or " ".join(note.content.split())[:80]
        detail = note.summary or " ".join(note.content.split())[:200]
        tags = f"  [{', '.join('#' + t for t in note.tags)}]" if note.tags else ""
        lines.append(f"- {title}{tags}")
        if detail and detail != title:
            lines.append(f"  {detail}")
    return "\n".join(lines)


def _digest_batch_run(due: list[RecipientDigestSchedule], *, now: datetime, horizon: int) -> int:
    """Call holding the schedules' row locks. Queues their digests and moves every schedule on,
    in a handful of statements for the whole batch. Returns how many digests were queued.

    `horizon` is digest_notes_horizon(), read before the notes were: a note of an older
    transaction moves the cursor; one of a younger transaction (committed while an older one
    is still open, which may yet commit a note before it in the cursor's order) is sent and
    recorded as sent ahead, and the cursor stays where the late note will find it.
    """
    sending = [schedule.id for schedule in due if not schedule.recipient.is_muted(now=now)]
    unsent = recipient_digest_schedules_unsent_notes(schedule_ids=sending)
    allowed = _digests_within_quota(Counter(schedule.owner_id for schedule in due if unsent.get(schedule.id)))
    emails = []
    ahead: list[tuple[int, int, int]] = []  # (schedule id, note xid, note id)
    for schedule in due:
        notes = unsent.get(schedule.id)
        if notes and allowed[schedule.owner_id] > 0:
            allowed[schedule.owner_id] -= 1
            emails.append(
                QueuedEmail(
                    owner_id=schedule.owner_id,
                    recipient_id=schedule.recipient_id,
                    subject=f"Your {schedule.frequency} secondbrain digest",
                    body=_digest_body([unsent_note.note for unsent_note in notes]),
                )
            )
            schedule.last_digest_sent = now
            settled = [unsent_note for unsent_note in notes if unsent_note.xid < horizon]  # come first
            if settled:
                schedule.last_note_xid, schedule.last_note_id = settled[-1].xid, settled[-1].note.id
            ahead += [(schedule.id, n.xid, n.note.id) for n in notes[len(settled) :]]
        # After a downtime this jumps over every missed period: one digest, not one per period.
        schedule.next_digest_scheduled = _compute_next(schedule, now=now)
        schedule.updated_at = now
    if emails:
        notifications_queue(emails, notification_type="digest", priority="normal")
    with connection.cursor() as cursor:
        cursor.execute(
            _ADVANCE,
            [
                now,
                [s.id for s in due],
                [s.last_digest_sent for s in due],
                [s.last_note_xid for s in due],
                [s.last_note_id for s in due],
                [s.next_digest_scheduled for s in due],
            ],
        )
        cursor.execute(_PASSED, [[s.id for s in due]])
        if ahead:
            cursor.execute(_SENT_AHEAD, [list(column) for column in zip(*ahead, strict=True)])
    return len(emails)


def _digests_within_quota(wanted: Counter[int]) -> Counter[int]:
    """How many of its wanted digests each owner's daily e-mail quota allows now (counted).

    A digest that does not fit is not sent: its notes stay unsent and go with the owner's next
    digest once the quota allows. One statement per owner when everything fits."""
    allowed: Counter[int] = Counter()
    for owner_id, count in wanted.items():
        if email_quota_fits(owner_id=owner_id, count=count):
            allowed[owner_id] = count
            continue
        while allowed[owner_id] < count and email_quota_fits(owner_id=owner_id, count=1):
            allowed[owner_id] += 1
    return allowed


# Every schedule of a batch moved on in one statement (Django's bulk_update writes a CASE per
# row and column, which grows with the square of the batch).
_ADVANCE = """
UPDATE digest_schedules AS s
   SET last_digest_sent = v.last_digest_sent, last_note_xid = v.last_note_xid, last_note_id = v.last_note_id,
       next_digest_scheduled = v.next_digest_scheduled, updated_at = %s
  FROM unnest(%s::bigint[], %s::timestamptz[], %s::bigint[], %s::bigint[], %s::timestamptz[])
       AS v (id, last_digest_sent, last_note_xid, last_note_id, next_digest_scheduled)
 WHERE s.id = v.id
"""
# Notes sent ahead of their schedule's cursor are recorded; those the cursor has passed are
# forgotten (run after _ADVANCE, so it reads the new cursors).
_PASSED = """
DELETE FROM digest_notes_sent_ahead AS ahead
 USING digest_schedules AS s
 WHERE s.id = ANY(%s::bigint[])
   AND ahead.schedule_id = s.id
   AND (ahead.note_xid, ahead.note_id) <= (s.last_note_xid, s.last_note_id)
"""
_SENT_AHEAD = """
INSERT INTO digest_notes_sent_ahead (schedule_id, note_xid, note_id)
SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[])
"""


def digest_sweep(*, now: datetime | None = None, batch_size: int = SWEEP_BATCH) -> int:
    """Queue the digests of every due schedule; returns how many were queued.

    Each batch is one transaction holding its schedules with SKIP LOCKED, so concurrent sweeps
    share the work without doing any of it twice, and a crash leaves every schedule either
    untouched or fully advanced with its notification. What is due is decided by the
    database's clock, the one every worker shares.
    """
    now = now or db_now()
    queued = 0
    while True:
        with transaction.atomic():
            horizon = digest_notes_horizon()  # first: before this transaction holds an id of its own
            due = list(
                RecipientDigestSchedule.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("recipient")
                .filter(active=True, next_digest_scheduled__lte=now)
                .order_by("next_digest_scheduled", "id")[:batch_size]
            )
            queued += _digest_batch_run(due, now=now, horizon=horizon)
        if len(due) < batch_size:
            return queued


# --- The weekly AI digest ------------------------------------------------------------------
WEEKLY_SYSTEM_PROMPT = (
    "You write a short weekly digest of a person's notes: the main themes, decisions, open "
    "questions and tasks, in plain text with short paragraphs or bullet points. Be concise."
)
MAX_NOTE_CHARS_IN_PROMPT = 1_500
MAX_PROMPT_CHARS = 60_000


def weekly_digest_fanout(*, period_end: datetime) -> int:
    """One digest job per active user; a user never has two waiting (queueing lock).

    The jobs are one batch, deferred in one transaction: when the last has ended, its callback
    (`digests.weekly_run_record`) records the run."""
    from digests.tasks import weekly_digest, weekly_digest_run_record  # tasks import services

    deferred = 0
    ends_at = int(period_end.timestamp())
    on_complete = job_call(weekly_digest_run_record, period_end=ends_at)
    with job_batch(on_complete=on_complete, name=f"weekly digest {period_end:%Y-%m-%d}"):
        for user_id in get_user_model().objects.filter(is_active=True).values_list("id", flat=True).iterator():
            job_id = job_defer(
                weekly_digest,
                queueing_lock=f"weekly-digest:{user_id}",
                owner_id=user_id,
                user_id=user_id,
                period_end=ends_at,
            )
            deferred += job_id is not None
    return deferred


def weekly_digest_run_record(
    *, period_end: datetime, batch_id: int, total: int, succeeded: int, failed: int, cancelled: int
) -> dict[str, Any]:
    """The weekly fan-out's callback: how many users it served and how many got the plain
    digest (AI unavailable). Logged, and kept as the callback job's result (the jobs API)."""
    digests = WeeklyDigest.objects.filter(period_start=period_end - WEEK)
    run = {
        "period_end": period_end.isoformat(),
        "users": total,
        "digests": digests.count(),
        "plain": digests.filter(ai_generated=False).count(),
        "failed": failed,
        "cancelled": cancelled,
    }
    logger.info("weekly digest run (batch %s): %s", batch_id, run)
    return run


def _plain_digest(notes: list[Note]) -> str:
    if not notes:
        return "No new notes this week."
    tags: dict[str, int] = {}
    types: dict[str, int] = {}
    for note in notes:
        types[note.note_type] = types.get(note.note_type, 0) + 1
        for tag in {*note.tags, *note.ai_tags}:
            tags[tag] = tags.get(tag, 0) + 1
    lines = [f"{len(notes)} notes this week."]
    lines.append("By type: " + ", ".join(f"{t} {n}" for t, n in sorted(types.items(), key=lambda x: -x[1])))
    if tags:
        top = sorted(tags.items(), key=lambda x: (-x[1], x[0]))[:15]
        lines.append("Tags: " + ", ".join(f"#{t} ({n})" for t, n in top))
    lines.append("")
    lines += [f"- {note.title or ' '.join(note.content.split())[:80]}" for note in notes]
    return "\n".join(lines)


def _weekly_prompt(notes: list[Note]) -> str:
    parts, size = [], 0
    for note in notes:
        text = f"[{note.created_at:%a %d %b}] {note.title}\n{note.content[:MAX_NOTE_CHARS_IN_PROMPT]}"
        if size + len(text) > MAX_PROMPT_CHARS:
            parts.append(f"... and {len(notes) - len(parts)} more notes.")
            break
        parts.append(text)
        size += len(text)
    return "Here are this week's notes:\n\n" + "\n\n".join(parts)


def weekly_digest_generate(*, user_id: int, period_end: datetime, ai_unavailable: str = "") -> WeeklyDigest:
    """Write the user's digest for the week ending at `period_end` (idempotent: one per period).

    With no API key, no budget left, or `ai_unavailable` given (the AI attempts failed), the
    digest is written without AI: titles, tags and counts. Never nothing.
    Raises core.errors.ProviderError when Claude fails and a retry may help.
    """
    start = period_end - WEEK
    notes = notes_in_period(owner_id=user_id, start=start, end=period_end)
    fields: dict[str, Any] = {"period_end": period_end, "note_count": len(notes), "ai_generated": False}
    reason = ai_unavailable or ("" if notes else "no notes in the period")
    if not reason:
        try:
            completion = llm_complete(
                purpose="weekly_digest",
                system=WEEKLY_SYSTEM_PROMPT,
                prompt=_weekly_prompt(notes),
                owner_id=user_id,
                max_tokens=1500,
            )
        except LlmUnavailable as exc:
            reason = str(exc)
        else:
            fields.update(
                content=completion.text.strip(),
                ai_generated=True,
                fallback_reason="",
                input_tokens=completion.input_tokens,
                output_tokens=completion.output_tokens,
                cost_usd=completion.cost_usd,
            )
    if not fields["ai_generated"]:
        fields.update(content=_plain_digest(notes), fallback_reason=reason[:300])
    digest, _ = WeeklyDigest.objects.update_or_create(owner_id=user_id, period_start=start, defaults=fields)
    return digest
