from __future__ import annotations

from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q, QuerySet

from digests.models import Digest, DigestSchedule
from notes.models import Note


def digest_schedule_list(*, owner: AbstractBaseUser) -> QuerySet[DigestSchedule]:
    return DigestSchedule.objects.filter(owner=owner)


def digest_list(*, owner: AbstractBaseUser) -> QuerySet[Digest]:
    return Digest.objects.filter(owner=owner)


def digest_schedule_unsent_notes(*, schedule: DigestSchedule) -> list[Note]:
    """The owner's notes not yet sent by this schedule, oldest first, filtered and capped."""
    notes = Note.objects.filter(owner_id=schedule.owner_id, id__gt=schedule.last_note_id)
    if schedule.note_types:
        notes = notes.filter(note_type__in=schedule.note_types)
    if schedule.tags:
        notes = notes.filter(Q(tags__overlap=schedule.tags) | Q(ai_tags__overlap=schedule.tags))
    return list(notes.only("id", "title", "content", "summary", "tags").order_by("id")[: schedule.max_notes])


def notes_in_period(*, owner_id: int, start: datetime, end: datetime) -> list[Note]:
    return list(
        Note.objects.filter(owner_id=owner_id, created_at__gte=start, created_at__lt=end).order_by("created_at", "id")
    )
