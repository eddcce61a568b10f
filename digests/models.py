from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from notifications.models import Recipient


class Frequency(models.TextChoices):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


class DigestSchedule(models.Model):
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
    # The newest note already sent: the next digest takes notes after it.
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


class Digest(models.Model):
    """The weekly secondbrain digest of a user's notes: AI-written, or plain when AI is not available."""

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
