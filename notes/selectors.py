from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from notes.models import Note, NoteImport

ENRICHMENT_CANDIDATES = 20


def note_list(*, owner: AbstractBaseUser) -> QuerySet[Note]:
    return Note.objects.filter(owner=owner)


def note_enrichment_candidates(*, note: Note, limit: int = ENRICHMENT_CANDIDATES) -> list[Note]:
    """The owner's most recent other notes, offered to Claude as possible connections."""
    return list(
        Note.objects.filter(owner_id=note.owner_id)
        .exclude(id=note.id)
        .only("id", "title", "content")
        .order_by("-created_at", "-id")[:limit]
    )


def note_import_list(*, owner: AbstractBaseUser) -> QuerySet[NoteImport]:
    """The owner's imports, newest first (without the stored files)."""
    return NoteImport.objects.filter(owner=owner)
