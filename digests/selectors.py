from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import QuerySet

from digests.models import Digest, DigestSchedule
from notes.models import Note


def digest_schedule_list(*, owner: AbstractBaseUser) -> QuerySet[DigestSchedule]:
    return DigestSchedule.objects.filter(owner=owner)


def digest_list(*, owner: AbstractBaseUser) -> QuerySet[Digest]:
    return Digest.objects.filter(owner=owner)


# For each schedule, the ids of the owner's notes it has not sent yet: after its last sent note,
# of its types and tags (empty means all), oldest first, at most max_notes. One query per batch.
_UNSENT_NOTE_IDS = """
SELECT schedule.id, note.id
  FROM digest_schedules AS schedule
 CROSS JOIN LATERAL (
       SELECT n.id
         FROM notes AS n
        WHERE n.owner_id = schedule.owner_id
          AND n.id > schedule.last_note_id
          AND (cardinality(schedule.note_types) = 0 OR n.note_type = ANY(schedule.note_types))
          AND (cardinality(schedule.tags) = 0 OR n.tags && schedule.tags OR n.ai_tags && schedule.tags)
        ORDER BY n.id
        LIMIT schedule.max_notes
       ) AS note
 WHERE schedule.id = ANY(%s)
 ORDER BY schedule.id, note.id
"""


def digest_schedules_unsent_notes(*, schedule_ids: list[int]) -> dict[int, list[Note]]:
    """{schedule id: the notes it has not sent yet, oldest first}, in two queries for any number."""
    if not schedule_ids:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(_UNSENT_NOTE_IDS, [schedule_ids])
        pairs = cursor.fetchall()
    notes = Note.objects.only("id", "title", "content", "summary", "tags").in_bulk({note_id for _, note_id in pairs})
    unsent: dict[int, list[Note]] = defaultdict(list)
    for schedule_id, note_id in pairs:
        unsent[schedule_id].append(notes[note_id])
    return dict(unsent)


def notes_in_period(*, owner_id: int, start: datetime, end: datetime) -> list[Note]:
    return list(
        Note.objects.filter(owner_id=owner_id, created_at__gte=start, created_at__lt=end).order_by("created_at", "id")
    )
