from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from jobs.services import job_defer
from llm.client import ProviderError
from llm.services import LlmUnavailable, llm_complete
from notes import enrichment, tier1
from notes.models import EnrichmentStatus, Note
from notes.selectors import note_enrichment_candidates


def _enrichment_defer(note: Note) -> None:
    from notes.tasks import note_enrich  # tasks import services; import late to avoid a cycle

    # One waiting job per note (it reads the latest content when it runs), and never two
    # running at once for the same note.
    job_defer(
        note_enrich,
        queueing_lock=f"note-enrich:{note.id}",
        lock=f"note:{note.id}",
        owner_id=note.owner_id,
        note_id=note.id,
    )


def _apply_tier1(note: Note) -> None:
    meta = tier1.analyse(note.content)
    note.word_count = meta.word_count
    note.tags = meta.tags
    note.links = meta.links
    note.note_type = meta.note_type


@transaction.atomic
def note_create(*, owner: AbstractBaseUser, content: str, title: str = "") -> Note:
    note = Note(owner=owner, title=title, content=content)
    _apply_tier1(note)
    note.save()
    _enrichment_defer(note)
    return note


@transaction.atomic
def note_update(*, note: Note, content: str | None = None, title: str | None = None) -> Note:
    if title is not None:
        note.title = title
    if content is not None and content != note.content:
        note.content = content
        note.content_version = F("content_version") + 1
        _apply_tier1(note)
        note.enrichment_status = EnrichmentStatus.PENDING
        note.enrichment_error = ""
        note.save()
        note.refresh_from_db(fields=["content_version"])
        _enrichment_defer(note)
    else:
        note.save()
    return note


@transaction.atomic
def note_delete(*, note: Note) -> None:
    note.delete()


def _note_set_status(*, note_id: int, status: str, error: str = "", version: int | None = None) -> int:
    notes = Note.objects.filter(id=note_id)
    if version is not None:
        notes = notes.filter(content_version=version)
    return notes.update(enrichment_status=status, enrichment_error=error[:2000])


def note_enrich(*, note_id: int) -> str:
    """Tier-2 enrichment of one note with Claude. Returns the resulting enrichment status.

    Idempotent: results are written only for the content version that was read, so a late
    answer never overwrites a newer edit (whose own job is already queued).
    Raises llm.client.ProviderError when Claude fails (the task decides about retrying).
    """
    note = Note.objects.filter(id=note_id).first()
    if note is None:
        return "deleted"
    version = note.content_version
    _note_set_status(note_id=note_id, status=EnrichmentStatus.PROCESSING, version=version)

    candidates = note_enrichment_candidates(note=note)
    try:
        completion = llm_complete(
            purpose="note_enrichment",
            system=enrichment.SYSTEM_PROMPT,
            prompt=enrichment.build_prompt(note, candidates),
            owner_id=note.owner_id,
            max_tokens=512,
        )
    except LlmUnavailable as exc:
        _note_set_status(note_id=note_id, status=EnrichmentStatus.SKIPPED, error=str(exc), version=version)
        return EnrichmentStatus.SKIPPED
    try:
        result = enrichment.parse_answer(completion.text, candidate_ids={c.id for c in candidates})
    except enrichment.UnparseableAnswer as exc:
        raise ProviderError(f"unparseable answer from Claude: {exc}", permanent=False) from exc

    updated = Note.objects.filter(id=note_id, content_version=version).update(
        ai_type=result.note_type,
        note_type=result.note_type,
        ai_tags=result.tags,
        summary=result.summary,
        connections=result.connections,
        enrichment_status=EnrichmentStatus.DONE,
        enrichment_error="",
        enriched_at=timezone.now(),
    )
    return EnrichmentStatus.DONE if updated else "superseded"


def note_enrichment_failed(*, note_id: int, error: str, final: bool) -> None:
    """Record a failed attempt: `failed` after the last one, back to `pending` before a retry."""
    status = EnrichmentStatus.FAILED if final else EnrichmentStatus.PENDING
    prefix = "" if final else "retrying after: "
    _note_set_status(note_id=note_id, status=status, error=prefix + error)
