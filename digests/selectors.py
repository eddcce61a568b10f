from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import QuerySet

from digests.models import RecipientDigestSchedule, WeeklyDigest
from notes.models import Note


def recipient_digest_schedule_list(*, owner: AbstractBaseUser) -> QuerySet[RecipientDigestSchedule]:
    return RecipientDigestSchedule.objects.filter(owner=owner)


def weekly_digest_list(*, owner: AbstractBaseUser) -> QuerySet[WeeklyDigest]:
    return WeeklyDigest.objects.filter(owner=owner)


# For each schedule, the notes it has not sent yet: after its cursor (see RecipientDigestSchedule), not
# sent ahead of it already, of its types and tags (empty means all), in the cursor's order, at
# most max_notes. One query per batch.
_UNSENT_NOTES = """
SELECT schedule.id, note.id, note.created_xid
  FROM digest_schedules AS schedule
 CROSS JOIN LATERAL (
       SELECT n.id, n.created_xid
         FROM notes AS n
        WHERE n.owner_id = schedule.owner_id
          AND (n.created_xid, n.id) > (schedule.last_note_xid, schedule.last_note_id)
          AND (cardinality(schedule.note_types) = 0 OR n.note_type = ANY(schedule.note_types))
          AND (cardinality(schedule.tags) = 0 OR n.tags && schedule.tags OR n.ai_tags && schedule.tags)
          AND NOT EXISTS (
                  SELECT 1
                    FROM digest_notes_sent_ahead AS ahead
                   WHERE ahead.schedule_id = schedule.id AND ahead.note_xid = n.created_xid AND ahead.note_id = n.id
              )
        ORDER BY n.created_xid, n.id
        LIMIT schedule.max_notes
       ) AS note
 WHERE schedule.id = ANY(%s)
 ORDER BY schedule.id, note.created_xid, note.id
"""


@dataclass(frozen=True)
class UnsentNote:
    note: Note
    xid: int  # the id of the transaction that created it


def digest_notes_horizon() -> int:
    """The oldest transaction still in progress: every note of an older one is committed (or
    rolled back) for good, so a digest cursor may move over it without skipping a late note."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        return cursor.fetchone()[0]


def recipient_digest_schedules_unsent_notes(*, schedule_ids: list[int]) -> dict[int, list[UnsentNote]]:
    """{schedule id: the notes it has not sent yet, in order}, in two queries for any number."""
    if not schedule_ids:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(_UNSENT_NOTES, [schedule_ids])
        rows = cursor.fetchall()
    notes = Note.objects.only("id", "title", "content", "summary", "tags").in_bulk({note_id for _, note_id, _ in rows})
    unsent: dict[int, list[UnsentNote]] = defaultdict(list)
    for schedule_id, note_id, xid in rows:
        unsent[schedule_id].append(UnsentNote(note=notes[note_id], xid=xid))
    return dict(unsent)


def notes_in_period(*, owner_id: int, start: datetime, end: datetime) -> list[Note]:
    return list(
        Note.objects.filter(owner_id=owner_id, created_at__gte=start, created_at__lt=end).order_by("created_at", "id")
    )
