from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models.functions import Now


class RateLimitBucket(models.Model):
    """A token bucket shared by every process: `tokens` as of `updated_at`, refilled on read."""

    key = models.CharField(max_length=200, primary_key=True)
    tokens = models.FloatField()
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "jobs_rate_limit_buckets"

    def __str__(self) -> str:
        return self.key


class CircuitBreaker(models.Model):
    """Shared state of a circuit breaker in front of an external service."""

    class State(models.TextChoices):
        CLOSED = "closed"
        OPEN = "open"
        HALF_OPEN = "half_open"

    name = models.CharField(max_length=100, primary_key=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.CLOSED)
    consecutive_failures = models.PositiveIntegerField(default=0)
    opened_until = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "jobs_circuit_breakers"

    def __str__(self) -> str:
        return f"{self.name}: {self.state}"


class JobInfo(models.Model):
    """What secondbrain knows about a Procrastinate job beyond its row: who it belongs to, its
    progress and result, its deduplication key and its completion webhook.

    One row per job deferred through `jobs.tasking.defer.job_defer` (periodic jobs have none). The
    row goes when its job goes: a database foreign key with ON DELETE CASCADE (migration 0002).
    """

    job = models.OneToOneField(
        "procrastinate.ProcrastinateJob",
        primary_key=True,
        on_delete=models.DO_NOTHING,  # the database cascades (see the migration)
        db_constraint=False,
        related_name="info",
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    dedup_key = models.CharField(max_length=200, blank=True, default="", db_default="")
    dedup_until = models.DateTimeField(null=True, blank=True)
    callback_url = models.URLField(max_length=2000, blank=True, default="", db_default="")
    processed = models.BigIntegerField(null=True, blank=True)
    total = models.BigIntegerField(null=True, blank=True)
    progress = models.JSONField(default=dict, db_default=models.Value({}, models.JSONField()), blank=True)
    progress_at = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    result_expires_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, default="", db_default="")
    # How many times the job snoozed (`raise JobSnooze(seconds=...)`), capped by the task's max_snoozes.
    snoozes = models.IntegerField(default=0, db_default=0)
    # Set while a client streams this job: only watched jobs NOTIFY on status changes.
    watched = models.BooleanField(default=False, db_default=False)

    class Meta:
        db_table = "jobs_job_info"
        indexes = [
            models.Index(fields=["owner", "job"], name="jobs_info_owner_job"),
            models.Index(
                fields=["dedup_key", "dedup_until"], name="jobs_info_dedup", condition=~models.Q(dedup_key="")
            ),
            # The end trigger's lookups (migration 0006): the few watched jobs and jobs with a
            # webhook, never every kept job's row, whatever plan the statistics lead to.
            models.Index(fields=["job"], name="jobs_info_watched", condition=models.Q(watched=True)),
            models.Index(fields=["job"], name="jobs_info_callback", condition=~models.Q(callback_url="")),
        ]
        permissions = [
            ("retry_job", "Can retry jobs of any user"),
            ("cancel_job", "Can cancel jobs of any user"),
            ("pause_queue", "Can pause and resume queues"),
        ]

    def __str__(self) -> str:
        return f"job {self.job_id}"


class PausedQueue(models.Model):
    """A queue listed here is skipped by every worker's fetch until the row is deleted."""

    queue_name = models.CharField(max_length=128, primary_key=True)
    paused_at = models.DateTimeField(auto_now_add=True)
    paused_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        db_table = "jobs_paused_queues"

    def __str__(self) -> str:
        return self.queue_name


class WebhookSecret(models.Model):
    """A user's key for signing their completion webhooks, so a receiver of one user's webhooks
    cannot forge deliveries to another's. Made on first use; rotating replaces it at once (every
    delivery sent afterwards, retries included, is signed with the new one)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, primary_key=True, on_delete=models.CASCADE, related_name="webhook_secret"
    )
    secret = models.CharField(max_length=100)
    created_at = models.DateTimeField()  # when this secret was made: the first use or the last rotation

    class Meta:
        db_table = "jobs_webhook_secrets"

    def __str__(self) -> str:
        return f"webhook secret of user {self.user_id}"


class JobBatch(models.Model):
    """A group of jobs whose callbacks are deferred once, when the last of them has ended.

    `state`: `open` while members may still be added, `sealed` once none will be (it completes
    when every member has ended), `done`. The counts are kept by the status trigger of migration
    0008, which also defers the callbacks (`callbacks`: {"on_success"|"on_failure"|"on_complete":
    {"task", "queue", "priority", "lock", "kwargs"}}) in the transaction that ends the last
    member. Members are the jobs whose `procrastinate_jobs.jobs_batch_id` is this id.
    """

    class State(models.TextChoices):
        OPEN = "open"
        SEALED = "sealed"
        DONE = "done"

    key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    name = models.CharField(max_length=200, blank=True, default="", db_default="")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    state = models.CharField(max_length=6, default=State.OPEN, db_default=State.OPEN)
    total = models.BigIntegerField(default=0, db_default=0)
    succeeded = models.BigIntegerField(default=0, db_default=0)
    failed = models.BigIntegerField(default=0, db_default=0)
    cancelled = models.BigIntegerField(default=0, db_default=0)
    callbacks = models.JSONField(default=dict, blank=True)
    callback_url = models.URLField(max_length=2000, blank=True, default="", db_default="")
    callback_job_ids = models.JSONField(default=list, blank=True)
    completions = models.IntegerField(default=0, db_default=0)
    created_at = models.DateTimeField(db_default=Now())
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "jobs_batches"
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"batch {self.id}"

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled
