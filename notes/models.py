from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models


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

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "notes"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="notes_owner_created_idx"),
            GinIndex(fields=["tags"], name="notes_tags_gin"),
            GinIndex(fields=["ai_tags"], name="notes_ai_tags_gin"),
        ]

    def __str__(self) -> str:
        return self.title or self.content[:60]
