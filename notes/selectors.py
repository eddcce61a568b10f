from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from jobs import job_batch_counts
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


def enrichment_batch_key(import_id: int) -> str:
    """The key of an import's enrichment batch (jobs_batches.key)."""
    return f"note-import:{import_id}"


def note_import_enrichment(*, import_id: int) -> dict[str, Any] | None:
    """The enrichment batch's progress: {"state", "total", "done", "succeeded", "failed",
    "cancelled"}, or None for an import without one."""
    batch = job_batch_counts(keys=[enrichment_batch_key(import_id)]).get(enrichment_batch_key(import_id))
    if batch is None:
        return None
    return {
        "state": batch.state,
        "total": batch.total,
        "done": batch.done,
        "succeeded": batch.succeeded,
        "failed": batch.failed,
        "cancelled": batch.cancelled,
    }
