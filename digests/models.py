from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from notifications.models import Recipient


class Frequency(models.TextChoices):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


class RecipientDigestSchedule(models.Model):
    """When to e-mail a recipient the notes that are new since the last digest (the sweep sends it);
    unrelated to the weekly AI digest (`WeeklyDigest`), which is stored, not sent."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="digest_schedules")
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="digest_schedules")
    frequency = models.CharField(max_length=10, choices=Frequency.choices)
    delivery_time = models.TimeField()
    delivery_day = models.PositiveSmallIntegerField(null=True, blank=True)  # weekly 1-7 (Mon=1), monthly 1-31
    timezone = models.CharField(max_length=64, default="UTC")
    active = models.BooleanField(default=True)
    last_digest_sent = models.DateTimeField(null=True, blank=True)
    next_digest_scheduled = models.DateTimeField(null=True, blank=True)
    max_notes = models.PositiveIntegerField(default=20)
    note_types = ArrayField(models.CharField(max_length=20), default=list, blank=True)  # empty: all
    tags = ArrayField(models.CharField(max_length=64), default=list, blank=True)  # empty: all
    # The cursor: the last note sent, as (its transaction's id, its id). Notes are taken in that
    # order, and the cursor only moves over notes whose transaction is older than every one
    # still in progress, so a note that commits late is never behind it (see selectors).
    last_note_xid = models.BigIntegerField(default=0)
    last_note_id = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "digest_schedules"
        ordering = ["id"]
        indexes = [
            models.Index(fields=["next_digest_scheduled"], name="digest_sched_due_idx", condition=models.Q(active=True))
        ]

    def __str__(self) -> str:
        return f"{self.frequency} digest for {self.recipient_id}"


class DigestNoteSentAhead(models.Model):
    """A note a schedule has sent beyond its cursor (its transaction was younger than one still in
    progress): it is not sent again, and the row goes once the cursor has passed it."""

    schedule = models.ForeignKey(RecipientDigestSchedule, on_delete=models.CASCADE, related_name="+")
    note_xid = models.BigIntegerField()
    note_id = models.BigIntegerField()

    class Meta:
        db_table = "digest_notes_sent_ahead"
        constraints = [
            models.UniqueConstraint(fields=["schedule", "note_xid", "note_id"], name="digest_sent_ahead_unique")
        ]

    def __str__(self) -> str:
        return f"note {self.note_id} sent ahead by schedule {self.schedule_id}"


class WeeklyDigest(models.Model):
    """The weekly secondbrain digest of a user's notes, stored for the user to read (`/api/digests/`):
    AI-written, or plain when AI is not available."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="digests")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    content = models.TextField()
    ai_generated = models.BooleanField(default=False)
    fallback_reason = models.CharField(max_length=300, blank=True)
    note_count = models.PositiveIntegerField(default=0)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    generated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "digests"
        ordering = ["-period_end", "-id"]
        constraints = [models.UniqueConstraint(fields=["owner", "period_start"], name="digest_one_per_period")]

    def __str__(self) -> str:
        return f"digest of {self.owner_id} for {self.period_start:%Y-%m-%d}"
