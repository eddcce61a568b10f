from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from jobs import SERVICE_PRIORITY


class Recipient(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="recipients")
    name = models.CharField(max_length=200)
    email = models.EmailField()
    relationship = models.CharField(max_length=50, blank=True)
    timezone = models.CharField(max_length=64, default="UTC")
    muted_until = models.DateTimeField(null=True, blank=True)
    muted_indefinitely = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "notification_recipients"
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"

    def is_muted(self, *, now=None) -> bool:
        now = now or timezone.now()
        return self.muted_indefinitely or (self.muted_until is not None and self.muted_until > now)


class NotificationType(models.TextChoices):
    SYSTEM = "system"
    NOTE_SHARED = "note_shared"
    DIGEST = "digest"


class DeliveryMethod(models.TextChoices):
    EMAIL = "email"
    SMS = "sms"
    WHATSAPP = "whatsapp"


class Priority(models.TextChoices):
    URGENT = "urgent"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# Procrastinate runs higher numbers first. A user's priority orders only their own e-mails (the
# claim takes turns between users); a staff member's urgent and high e-mails go in the service
# band, ahead of every user's (jobs/tasking/fairness.py, docs/using.md "Priority and fairness").
JOB_PRIORITY = {Priority.URGENT: 30, Priority.HIGH: 20, Priority.NORMAL: 10, Priority.LOW: 0}
STAFF_JOB_PRIORITY = {
    **JOB_PRIORITY,
    Priority.URGENT: SERVICE_PRIORITY + 30,
    Priority.HIGH: SERVICE_PRIORITY + 20,
}


def job_priority(priority: str, *, staff: bool) -> int:
    """The job priority of a notification of this priority, sent by a staff member or not."""
    return (STAFF_JOB_PRIORITY if staff else JOB_PRIORITY)[priority]


class Status(models.TextChoices):
    PENDING = "pending"
    PROCESSING = "processing"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NotificationJob(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="notifications")
    notification_type = models.CharField(
        max_length=20, choices=NotificationType.choices, default=NotificationType.SYSTEM
    )
    delivery_method = models.CharField(max_length=20, choices=DeliveryMethod.choices, default=DeliveryMethod.EMAIL)
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.NORMAL)
    payload = models.JSONField(default=dict)  # {"subject": ..., "body": ...}
    scheduled_for = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    retry_count = models.PositiveIntegerField(default=0)
    provider_message_id = models.CharField(max_length=255, blank=True)
    error = models.TextField(blank=True)
    # The Procrastinate job that carries it now (a postponed send gets a new one). Not a
    # foreign key: job retention may delete finished job rows before these.
    procrastinate_job_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "notification_jobs"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="notif_owner_created_idx"),
            models.Index(fields=["status", "scheduled_for"], name="notif_status_sched_idx"),
            models.Index(fields=["created_at"], name="notif_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.notification_type} to {self.recipient_id} ({self.status})"


class DeliveryLog(models.Model):
    class Outcome(models.TextChoices):
        SENT = "sent"
        TRANSIENT_FAILURE = "transient_failure"
        PERMANENT_FAILURE = "permanent_failure"
        CANCELLED = "cancelled"
        POSTPONED = "postponed"

    notification = models.ForeignKey(NotificationJob, on_delete=models.CASCADE, related_name="delivery_logs")
    attempt = models.PositiveIntegerField()
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    error = models.TextField(blank=True)
    provider_response = models.TextField(blank=True)
    duration_ms = models.FloatField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "notification_delivery_logs"
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["created_at"], name="notif_log_created_idx")]  # retention

    def __str__(self) -> str:
        return f"attempt {self.attempt}: {self.outcome}"


class DeliveryCounter(models.Model):
    """Delivery logs ever written, by outcome, for /metrics: a statement-level trigger on
    notification_delivery_logs (migration 0005) adds each INSERT's rows in the same transaction,
    so a scrape sums a few rows instead of counting the logs, and purging logs never lowers it.
    Each outcome is spread over a few shards (the writer's backend pid) so concurrent senders
    don't queue on one row lock."""

    outcome = models.CharField(max_length=20)
    shard = models.SmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "notification_delivery_counters"
        constraints = [models.UniqueConstraint(fields=["outcome", "shard"], name="notif_delivery_counter_key")]

    def __str__(self) -> str:
        return f"{self.outcome}[{self.shard}]: {self.count}"
