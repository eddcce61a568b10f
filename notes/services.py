from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, TextIO

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone
from rest_framework import status as http

from core.errors import ApplicationError, ProviderError
from jobs import (
    job_batch_open,
    job_batch_seal,
    job_call,
    job_cancel_waiting,
    job_defer,
    job_defer_bulk,
    webhook_url_check,
)
from llm.services import LlmUnavailable, llm_complete
from notes import enrichment, import_formats, tier1
from notes.models import IMPORT_ENRICHED, EnrichmentStatus, ImportStatus, Note, NoteImport
from notes.selectors import enrichment_batch_key, note_enrichment_candidates
from notifications.services import notification_email_owner

logger = logging.getLogger(__name__)


def _note_lock(note_id: int) -> str:
    """The lock of every job working on one note: two never run at once."""
    return f"note:{note_id}"


def _enrichment_defer(note: Note) -> None:
    from notes.tasks import note_enrich  # tasks import services

    # One waiting job per note (it reads the latest content when it runs), and never two
    # running at once for the same note.
    job_defer(
        note_enrich,
        queueing_lock=f"note-enrich:{note.id}",
        lock=_note_lock(note.id),
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
    """Delete the note; its waiting jobs (an enrichment queued after an edit) end cancelled in
    the same transaction, and one running finds the note gone."""
    job_cancel_waiting(lock=_note_lock(note.id))
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
    Raises core.errors.ProviderError when Claude fails (the task decides about retrying).
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


# --- Bulk import ----------------------------------------------------------------------------

IMPORT_ERRORS_KEPT = 1000  # skipped rows listed with their line and reason; `skipped` counts all
IMPORT_READ_CHUNK_BYTES = 1 << 20  # one substring() per MiB of the stored file
IMPORT_BATCH_MAX_CHARS = 8 << 20  # a batch also ends at this much content, so big rows stay bounded
# Below interactive notes (priority 0): a 100,000-row import does not delay tomorrow's note.
IMPORT_ENRICH_PRIORITY = -10
_COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ImportProgress:
    processed: int
    total: int | None
    imported: int
    duplicates: int
    skipped: int


class _ImportSuperseded(Exception):
    """Another run of the same import committed the batch this run was about to write."""


@transaction.atomic
def note_import_create(
    *,
    owner: AbstractBaseUser,
    file: BinaryIO,
    filename: str,
    format: str,
    callback_url: str | None = None,
    notify_email: bool = False,
) -> NoteImport:
    """Store an uploaded file in PostgreSQL and defer `notes.import` for it, in one transaction.

    The input is already checked (NoteImportInputSerializer): a known format, a readable header,
    an e-mail address for `notify_email` (the owner is e-mailed once the enrichment has ended).
    The file is streamed into the row with COPY, so the web process never holds it whole.
    """
    from notes.tasks import note_import  # tasks import services

    if callback_url:
        webhook_url_check(callback_url)  # before copying megabytes for nothing
    _note_import_pending_check(owner_id=owner.pk, size=_file_size(file))
    import_id = _note_import_store(owner_id=owner.pk, file=file, filename=filename, format=format)
    job_id = job_defer(
        note_import,
        owner_id=owner.pk,
        lock=f"note-import:{import_id}",  # two runs of one import never overlap
        import_id=import_id,
    )
    # The completion webhook goes with the enrichment batch's callback: once, after the last
    # note's enrichment has ended, not when the rows are in.
    _enrichment_batch(owner_id=owner.pk, import_id=import_id, callback_url=callback_url)
    NoteImport.objects.filter(id=import_id).update(job_id=job_id, notify_email=notify_email)
    return NoteImport.objects.get(id=import_id)


def _enrichment_batch(*, owner_id: int, import_id: int, callback_url: str | None = None) -> int:
    """The batch of the import's enrichment jobs (opened with the import; an import created
    before batches existed gets one, without a webhook, at its next batch of rows)."""
    from notes.tasks import note_import_enriched  # tasks import services; import late to avoid a cycle

    return job_batch_open(
        key=enrichment_batch_key(import_id),
        on_complete=job_call(note_import_enriched, import_id=import_id),
        owner_id=owner_id,
        callback_url=callback_url,
        name=f"enrichment of import {import_id}",
    )


@transaction.atomic
def note_import_enriched(
    *, import_id: int, batch_id: int, total: int, succeeded: int, failed: int, cancelled: int
) -> dict[str, Any]:
    """The enrichment batch's callback: every note the import inserted has been enriched (or
    failed, or was cancelled). E-mails the owner if the import asked for it, once: a callback
    run again (retried, or the batch completing again) finds the e-mail already queued.
    Returns the import's summary, the completion webhook's `result`."""
    note_import = NoteImport.objects.get(id=import_id)
    status = IMPORT_ENRICHED if note_import.status == ImportStatus.DONE else note_import.status
    summary = {
        "import_id": import_id,
        "status": status,
        "total": note_import.total,
        "imported": note_import.imported,
        "duplicates": note_import.duplicates,
        "skipped": note_import.skipped,
        "enrichment": {"total": total, "succeeded": succeeded, "failed": failed, "cancelled": cancelled},
    }
    # The row lock makes a second run wait, then see the e-mail this one queued.
    unsent = NoteImport.objects.select_for_update().filter(
        id=import_id, notify_email=True, email_notification_id__isnull=True
    )
    if unsent.exists():
        notification = notification_email_owner(
            owner_id=note_import.owner_id, **_import_email(note_import=note_import, summary=summary)
        )
        if notification is None:
            logger.warning("Import %s: its owner has no e-mail address, nothing sent", import_id)
        else:
            unsent.update(email_notification_id=notification.id)
    return summary


def _import_email(*, note_import: NoteImport, summary: dict[str, Any]) -> dict[str, str]:
    name = note_import.filename or f"#{note_import.id}"
    enrichment = summary["enrichment"]
    outcome = "is enriched" if summary["status"] == IMPORT_ENRICHED else f"ended {summary['status']}"
    lines = [
        f"Your import {name} {outcome}.",
        "",
        f"Rows in the file: {summary['total'] if summary['total'] is not None else 'unknown'}",
        f"Notes imported: {summary['imported']}",
        f"Duplicates left out: {summary['duplicates']}",
        f"Rows skipped: {summary['skipped']}",
        f"Enrichment: {enrichment['succeeded']} done, {enrichment['failed']} failed,"
        f" {enrichment['cancelled']} cancelled, of {enrichment['total']}",
    ]
    if note_import.failure_reason:
        lines.append(f"Why the import failed: {note_import.failure_reason}")
    return {"subject": f"Import {name} {outcome}", "body": "\n".join(lines) + "\n"}


# Held to the end of the upload's transaction: one user's uploads are checked and stored one at
# a time, so parallel uploads cannot all see room under the cap. Namespaced like every lock here.
_PENDING_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_PENDING_BYTES = (
    "SELECT coalesce(sum(size), 0) FROM notes_import WHERE owner_id = %s AND status IN ('pending', 'running')"
)
PENDING_RETRY_AFTER_SECONDS = 60  # a hint: imports end at their own pace


def _file_size(file: BinaryIO) -> int:
    file.seek(0, io.SEEK_END)
    size = file.tell()
    file.seek(0)
    return size


def _note_import_pending_check(*, owner_id: int, size: int) -> None:
    """Refuse an upload that would take the owner's unfinished (pending or running) uploads past
    IMPORTS_PENDING_MAX_BYTES: 413 when the file alone is larger, else 429. Call inside the
    transaction that stores the file: the lock it takes lasts until that commit."""
    limit = settings.IMPORTS_PENDING_MAX_BYTES
    if size > limit:
        raise ApplicationError(
            "File too large.",
            status_code=http.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            extra={"file": [f"The file is {size} bytes; unfinished imports may hold at most {limit} bytes per user."]},
        )
    with connection.cursor() as cursor:
        cursor.execute(_PENDING_LOCK, [f"note-import-pending:{owner_id}"])
        cursor.execute(_PENDING_BYTES, [owner_id])
        pending = cursor.fetchone()[0]
    if pending + size > limit:
        raise ApplicationError(
            f"Your unfinished imports already hold {pending} bytes; with this file of {size} bytes they would"
            f" pass the limit of {limit} bytes per user. Upload it once some of them have finished.",
            status_code=http.HTTP_429_TOO_MANY_REQUESTS,
            extra={"pending_bytes": pending, "limit_bytes": limit, "retry_after": PENDING_RETRY_AFTER_SECONDS},
            headers={"Retry-After": str(PENDING_RETRY_AFTER_SECONDS)},
        )


def _copy_text(value: str) -> str:
    """A value in COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _note_import_store(*, owner_id: int, file: BinaryIO, filename: str, format: str) -> int:
    """INSERT the import row with the file's bytes, streamed as hex through COPY. Returns its id."""
    filename = "".join(ch for ch in filename if ch.isprintable())[: NoteImport._meta.get_field("filename").max_length]
    file.seek(0)
    size = 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT nextval(pg_get_serial_sequence('notes_import', 'id'))")
        import_id = cursor.fetchone()[0]
        head = "\t".join([str(import_id), str(owner_id), _copy_text(format), _copy_text(filename)])
        # The bytea literal "\x<hex>", its backslash doubled for COPY; `size` goes last, once counted.
        with cursor.cursor.copy("COPY notes_import (id, owner_id, format, filename, data, size) FROM STDIN") as copy:
            copy.write(head.encode() + b"\t\\\\x")
            while chunk := file.read(_COPY_CHUNK_BYTES):
                size += len(chunk)
                copy.write(chunk.hex().encode())
            copy.write(f"\t{size}\n".encode())
    return import_id


def note_import_run(*, import_id: int, on_progress: Callable[[ImportProgress], None] | None = None) -> NoteImport:
    """Import the stored file's rows as notes. Safe to run again at any point.

    - Counts the rows first (streaming), so progress has a total.
    - Then takes batches of IMPORTS_BATCH_SIZE rows. Each batch is one transaction: one
      multi-row INSERT ... ON CONFLICT DO NOTHING of its valid rows, one bulk defer of
      enrichment for exactly the notes inserted, and the import's counters and cursor.
    - A rerun (a retried job) resumes after `rows_done`; a row imported before (by this or any
      earlier import of the owner) meets the unique (owner, import_key) and counts as a duplicate.
    - `on_progress` is called after each batch, outside its transaction.

    Raises import_formats.ImportFileError when the file cannot be read at all (the header).
    """
    with transaction.atomic():
        note_import = NoteImport.objects.select_for_update().get(id=import_id)
        if note_import.status == ImportStatus.DONE:
            return note_import
        if note_import.file_deleted_at is not None:
            raise import_formats.ImportFileError(
                f"The file of this import was deleted on {note_import.file_deleted_at:%Y-%m-%d %H:%M} UTC,"
                f" {settings.IMPORTS_FILE_RETENTION_HOURS:g} hours after the import ended; upload it again."
            )
        note_import.status = ImportStatus.RUNNING
        note_import.started_at = note_import.started_at or timezone.now()
        note_import.failure_reason = ""
        note_import.save(update_fields=["status", "started_at", "failure_reason"])

    if note_import.total is None:
        with _stored_text(note_import) as text:
            note_import.total = import_formats.count_records(text, note_import.format)
        NoteImport.objects.filter(id=import_id).update(total=note_import.total)
    if on_progress:
        on_progress(_import_progress(note_import))

    with _stored_text(note_import) as text:
        records = import_formats.read_records(text, note_import.format)
        for _ in itertools.islice(records, note_import.rows_done):  # done by an earlier run
            pass
        for batch in _import_batches(records):
            try:
                note_import = _note_import_batch(note_import=note_import, records=batch)
            except _ImportSuperseded:
                return NoteImport.objects.get(id=import_id)
            if on_progress:
                on_progress(_import_progress(note_import))

    with transaction.atomic():
        NoteImport.objects.filter(id=import_id).exclude(status=ImportStatus.DONE).update(
            status=ImportStatus.DONE, finished_at=timezone.now()
        )
        # No more notes: the batch completes when the last enrichment ends (now, if they have).
        job_batch_seal(_enrichment_batch(owner_id=note_import.owner_id, import_id=import_id))
    return NoteImport.objects.get(id=import_id)


def note_import_failed(*, import_id: int, reason: str) -> None:
    """The import's job gave up (its last attempt failed, or an operator aborted it). The notes
    it inserted are still enriched; the batch's callback (and webhook) then reports `failed`."""
    with transaction.atomic():
        NoteImport.objects.filter(id=import_id).exclude(status=ImportStatus.DONE).update(
            status=ImportStatus.FAILED, failure_reason=reason[:2000], finished_at=timezone.now()
        )
        owner_id = NoteImport.objects.filter(id=import_id).values_list("owner_id", flat=True).first()
        if owner_id is not None:
            job_batch_seal(_enrichment_batch(owner_id=owner_id, import_id=import_id))


# Batches in their own short transactions, skipping imports a run holds. Setting the column to
# no bytes frees its TOAST chunks (reclaimed by vacuum); the row and its counts stay.
_PURGE_FILES = """
UPDATE notes_import SET data = ''::bytea, file_deleted_at = now() WHERE id IN (
    SELECT id FROM notes_import
     WHERE file_deleted_at IS NULL AND status IN ('done', 'failed')
       AND finished_at < now() - make_interval(secs => %(seconds)s)
     LIMIT %(batch)s FOR UPDATE SKIP LOCKED
)
"""


def note_import_files_purge(*, batch_size: int | None = None, max_batches: int = 1000) -> dict[str, int]:
    """Delete the stored files of imports that ended (done or failed) more than
    IMPORTS_FILE_RETENTION_HOURS ago. Run by the periodic core.purge_expired (notes/apps.py)."""
    batch = batch_size or settings.JOBS_RETENTION_BATCH_SIZE
    params = {"seconds": settings.IMPORTS_FILE_RETENTION_HOURS * 3600, "batch": batch}
    total = 0
    with connection.cursor() as cursor:
        for _ in range(max_batches):
            with transaction.atomic():
                cursor.execute(_PURGE_FILES, params)
                total += cursor.rowcount
            if cursor.rowcount < batch:
                break
    if total:
        logger.info("Deleted the stored files of %s finished imports", total)
    return {"import_files": total}


def _import_progress(note_import: NoteImport) -> ImportProgress:
    return ImportProgress(
        processed=note_import.rows_done,
        total=note_import.total,
        imported=note_import.imported,
        duplicates=note_import.duplicates,
        skipped=note_import.skipped,
    )


@contextmanager
def _stored_text(note_import: NoteImport) -> Iterator[TextIO]:
    """The stored file as text, read IMPORT_READ_CHUNK_BYTES at a time with substring()."""
    import_id = note_import.id

    def fetch(offset: int, length: int) -> bytes:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT substring(data FROM %s FOR %s) FROM notes_import WHERE id = %s", [offset + 1, length, import_id]
            )
            return bytes(cursor.fetchone()[0])

    stream = import_formats.StoredFile(size=note_import.size, fetch=fetch, chunk_bytes=IMPORT_READ_CHUNK_BYTES)
    with import_formats.open_text(stream) as text:
        yield text


def _import_batches(records: Iterator[import_formats.Record]) -> Iterator[list[import_formats.Record]]:
    """Records in lists of IMPORTS_BATCH_SIZE, or fewer once they hold IMPORT_BATCH_MAX_CHARS."""
    batch: list[import_formats.Record] = []
    chars = 0
    for record in records:
        batch.append(record)
        if record.values:
            chars += sum(len(value) for value in record.values.values() if isinstance(value, str))
        if len(batch) >= settings.IMPORTS_BATCH_SIZE or chars >= IMPORT_BATCH_MAX_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@transaction.atomic
def _note_import_batch(*, note_import: NoteImport, records: list[import_formats.Record]) -> NoteImport:
    """Write one batch: its notes, their enrichment jobs and the import's counters, or nothing."""
    from notes.tasks import note_enrich  # tasks import services

    current = NoteImport.objects.select_for_update().only("rows_done", "errors").get(id=note_import.id)
    if current.rows_done != note_import.rows_done:
        raise _ImportSuperseded(f"import {note_import.id} is at row {current.rows_done}, not {note_import.rows_done}")

    notes: list[Note] = []
    errors: list[dict[str, Any]] = []
    for record in records:
        row = import_formats.row_validate(record)
        if isinstance(row, str):
            errors.append({"line": record.line, "reason": row})
            continue
        note = Note(owner_id=note_import.owner_id, title=row.title, content=row.content, import_key=row.import_key)
        _apply_tier1(note)  # as note_create does; the file's tags come first
        note.tags = list(dict.fromkeys([*row.tags, *note.tags]))
        notes.append(note)

    note_ids = _notes_insert_new(notes)
    job_defer_bulk(
        note_enrich,
        [{"note_id": note_id} for note_id in note_ids],
        owner_id=note_import.owner_id,
        priority=IMPORT_ENRICH_PRIORITY,
        batch_id=_enrichment_batch(owner_id=note_import.owner_id, import_id=note_import.id) if note_ids else None,
    )

    room = max(IMPORT_ERRORS_KEPT - len(current.errors), 0)
    note_import.errors = current.errors + errors[:room]
    note_import.rows_done += len(records)
    note_import.imported += len(note_ids)
    note_import.duplicates += len(notes) - len(note_ids)
    note_import.skipped += len(errors)
    note_import.save(update_fields=["errors", "rows_done", "imported", "duplicates", "skipped"])
    return note_import


def _json_datetime(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()  # to the microsecond (DjangoJSONEncoder keeps milliseconds)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _notes_insert_new(notes: list[Note]) -> list[int]:
    """One INSERT of `notes`; rows whose (owner, import_key) exists are left out. Returns the
    ids of the notes inserted.

    The rows travel as one JSON parameter (jsonb_to_recordset typed by the model's columns):
    a statement with a placeholder per value costs more to build than to run.
    """
    if not notes:
        return []
    quote = connection.ops.quote_name
    fields = [field for field in Note._meta.concrete_fields if not field.primary_key]
    columns = ", ".join(quote(field.column) for field in fields)
    record_type = ", ".join(f"{quote(field.column)} {field.db_type(connection)}" for field in fields)
    rows = [
        {field.column: field.get_db_prep_save(field.pre_save(note, True), connection) for field in fields}
        for note in notes
    ]
    sql = (
        f"INSERT INTO {quote(Note._meta.db_table)} ({columns})"
        f" SELECT {columns} FROM jsonb_to_recordset(%s::jsonb) AS r({record_type})"
        " ON CONFLICT (owner_id, import_key) WHERE import_key IS NOT NULL DO NOTHING RETURNING id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [json.dumps(rows, default=_json_datetime)])
        return [note_id for (note_id,) in cursor.fetchall()]
