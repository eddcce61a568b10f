from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models.functions import Now


class NoteType(models.TextChoices):
    NOTE = "note"
    TASK = "task"
    IDEA = "idea"
    QUESTION = "question"
    LINK = "link"
    MEETING = "meeting"
    JOURNAL = "journal"
    REFERENCE = "reference"


class EnrichmentStatus(models.TextChoices):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class Note(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notes")
    title = models.CharField(max_length=200, blank=True)
    content = models.TextField()
    # Bumped on every content edit; enrichment writes its result only for the version it read.
    content_version = models.PositiveIntegerField(default=1)

    # Tier-1: computed synchronously on capture, never waits on the network.
    word_count = models.PositiveIntegerField(default=0)
    tags = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    links = ArrayField(models.TextField(), default=list, blank=True)
    note_type = models.CharField(max_length=20, choices=NoteType.choices, default=NoteType.NOTE)

    # Tier-2: written by the enrichment job.
    enrichment_status = models.CharField(
        max_length=20, choices=EnrichmentStatus.choices, default=EnrichmentStatus.PENDING
    )
    enrichment_error = models.TextField(blank=True)
    ai_type = models.CharField(max_length=20, choices=NoteType.choices, blank=True)
    ai_tags = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    summary = models.CharField(max_length=500, blank=True)
    connections = ArrayField(models.BigIntegerField(), default=list, blank=True)
    enriched_at = models.DateTimeField(null=True, blank=True)

    # Set only by bulk import: the row's external_id, or "sha256:<hex>" of its title and content.
    # Unique per owner, so importing a row twice (a retried job, the same file uploaded again)
    # never makes a second note. NULL (not "") for notes written through the API: the partial
    # unique index then holds only imported notes.
    import_key = models.CharField(max_length=255, null=True, blank=True, editable=False)  # noqa: DJ001

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "notes"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="notes_owner_created_idx"),
            # A digest reads a user's notes after the last one it sent, in id order.
            models.Index(fields=["owner", "id"], name="notes_owner_id_idx"),
            GinIndex(fields=["tags"], name="notes_tags_gin"),
            GinIndex(fields=["ai_tags"], name="notes_ai_tags_gin"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "import_key"],
                condition=models.Q(import_key__isnull=False),
                name="notes_owner_import_key_uniq",
            ),
        ]

    def __str__(self) -> str:
        return self.title or self.content[:60]


class ImportFormat(models.TextChoices):
    CSV = "csv"
    JSONL = "jsonl"


class ImportStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# Not a stored status (the row stays `done`): the API shows a `done` import as `enriched` once
# the enrichment of every note it inserted has ended (its batch completed; notes.services).
IMPORT_ENRICHED = "enriched"


class NoteImportManager(models.Manager["NoteImport"]):
    def get_queryset(self) -> models.QuerySet[NoteImport]:
        # The file can be tens of megabytes: nothing loads it by accident (the admin, the API).
        # The worker reads it in slices with substring() (notes.services).
        return super().get_queryset().defer("data")


class NoteImport(models.Model):
    """One uploaded file of notes and how far its import has got.

    The file itself lives here too (`data`) until IMPORTS_FILE_RETENTION_HOURS after the import
    ended, so one database backup holds everything. The column is stored EXTERNAL (uncompressed
    TOAST, migration 0002): substring() then reads only the slices it asks for.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="note_imports")
    format = models.CharField(max_length=8, choices=ImportFormat.choices)
    filename = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField()
    data = models.BinaryField()
    status = models.CharField(
        max_length=10, choices=ImportStatus.choices, default=ImportStatus.PENDING, db_default=ImportStatus.PENDING
    )
    total = models.BigIntegerField(null=True, blank=True)  # rows in the file, counted before importing
    # Rows handled so far (imported, duplicate or skipped): the cursor a retried job resumes after.
    rows_done = models.BigIntegerField(default=0, db_default=0)
    imported = models.BigIntegerField(default=0, db_default=0)
    duplicates = models.BigIntegerField(default=0, db_default=0)
    skipped = models.BigIntegerField(default=0, db_default=0)
    # The first skipped rows, as {"line": n, "reason": "..."}; `skipped` counts them all.
    errors = models.JSONField(default=list, db_default=models.Value([], models.JSONField()), blank=True)
    failure_reason = models.TextField(blank=True, default="", db_default="")
    job_id = models.BigIntegerField(null=True, blank=True)  # the notes.import job (kept after its purge)
    # E-mail the owner once its enrichment batch completes; the notification that does it (an id
    # of notifications' NotificationJob, set in the transaction that queues it: never two).
    notify_email = models.BooleanField(default=False, db_default=False)
    email_notification_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # When the retention purge emptied `data` (IMPORTS_FILE_RETENTION_HOURS after the import
    # ended); the row, its counts and its notes stay.
    file_deleted_at = models.DateTimeField(null=True, blank=True)

    objects = NoteImportManager()

    class Meta:
        db_table = "notes_import"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="notes_import_owner_created"),
            # The files still stored, by when their import ended: what the purge looks at.
            models.Index(
                fields=["finished_at"], condition=models.Q(file_deleted_at__isnull=True), name="notes_import_file_kept"
            ),
        ]

    def __str__(self) -> str:
        return f"import {self.id} ({self.filename or self.format})"

    @property
    def processed(self) -> int:
        return self.rows_done
