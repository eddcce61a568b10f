"""Shapes of the jobs API: what a job, its timeline, a queue and the metrics look like."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from jobs.console.selectors import job_progress_summary


class ProgressSummarySerializer(serializers.Serializer):
    processed = serializers.IntegerField()
    total = serializers.IntegerField(allow_null=True)
    percent = serializers.FloatField(allow_null=True)


class ProgressSerializer(ProgressSummarySerializer):
    data = serializers.JSONField()
    updated_at = serializers.DateTimeField(allow_null=True)


class JobSerializer(serializers.Serializer):
    """One job in the list (an annotated row of `selectors.job_queryset`)."""

    id = serializers.IntegerField()
    task = serializers.CharField(source="task_name")
    queue = serializers.CharField(source="queue_name")
    status = serializers.CharField(source="state", help_text="A Procrastinate status, or `scheduled` (todo, not due).")
    priority = serializers.IntegerField()
    attempts = serializers.IntegerField()
    scheduled_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField(allow_null=True, help_text="When the job was deferred.")
    progress = serializers.SerializerMethodField()
    batch_id = serializers.IntegerField(allow_null=True, help_text="The batch the job belongs to.")
    parents_waiting = serializers.IntegerField(
        help_text="How many of its parents have not ended: blocked while > 0 (its detail names them)."
    )

    @extend_schema_field(ProgressSummarySerializer(allow_null=True))
    def get_progress(self, job: Any) -> dict[str, Any] | None:
        return job_progress_summary(processed=job.processed, total=job.total)


class TimelineEventSerializer(serializers.Serializer):
    type = serializers.CharField()
    at = serializers.DateTimeField(allow_null=True)
    duration_ms = serializers.FloatField(allow_null=True, help_text="Milliseconds since the previous event.")


class RelativeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    task = serializers.CharField()
    status = serializers.CharField()


class ParentSerializer(RelativeSerializer):
    dependency = serializers.ChoiceField(
        choices=["waiting", "succeeded", "failed"], help_text="`failed`: the parent failed, was cancelled or aborted."
    )
    on_parent_failure = serializers.ChoiceField(choices=["cancel", "run"])


class BatchSerializer(serializers.Serializer):
    """A batch (the dict of `selectors.batch_summary`)."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    owner_id = serializers.IntegerField(allow_null=True)
    state = serializers.ChoiceField(
        choices=["open", "sealed", "done"],
        help_text="`open`: members may still be added; `sealed`: waiting for members to end; `done`.",
    )
    total = serializers.IntegerField()
    done = serializers.IntegerField(help_text="Members that have ended: succeeded + failed + cancelled.")
    succeeded = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField(help_text="Cancelled or aborted.")
    percent = serializers.FloatField(allow_null=True)
    callbacks = serializers.ListField(child=serializers.CharField(), help_text="on_success, on_failure, on_complete")
    callback_job_ids = serializers.ListField(child=serializers.IntegerField(), help_text="The callback jobs deferred.")
    completions = serializers.IntegerField(help_text="1 once done; more when retried members reopened it.")
    created_at = serializers.DateTimeField()
    completed_at = serializers.DateTimeField(allow_null=True)


class BatchDetailSerializer(BatchSerializer):
    members_by_status = serializers.DictField(child=serializers.IntegerField())
    members = RelativeSerializer(
        many=True, help_text="The first 200 members, by id; all of them: GET /api/jobs/?batch={id}."
    )


class BatchRetrySerializer(serializers.Serializer):
    retried = serializers.ListField(child=serializers.IntegerField())
    refused = serializers.ListField(
        child=serializers.IntegerField(), help_text="A job with the same queueing lock waits and does their work."
    )


class ConcurrencySerializer(serializers.Serializer):
    key = serializers.CharField(help_text="The job's concurrency key, e.g. llm:user:42.")
    limit = serializers.IntegerField(help_text="At most this many jobs of the key run at once.")
    running = serializers.IntegerField(help_text="The key's jobs running now; at the limit, the job waits.")


class JobDetailSerializer(serializers.Serializer):
    """One job in full (the dict of `selectors.job_detail`)."""

    id = serializers.IntegerField()
    task = serializers.CharField()
    queue = serializers.CharField()
    status = serializers.CharField()
    priority = serializers.IntegerField()
    attempts = serializers.IntegerField()
    scheduled_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField(allow_null=True)
    lock = serializers.CharField(allow_null=True)
    queueing_lock = serializers.CharField(allow_null=True)
    args = serializers.JSONField()
    owner_id = serializers.IntegerField(allow_null=True)
    timeline = TimelineEventSerializer(many=True)
    run_time_ms = serializers.FloatField(allow_null=True)
    wait_time_ms = serializers.FloatField(allow_null=True)
    progress = ProgressSerializer(allow_null=True)
    result = serializers.JSONField(allow_null=True, help_text="Null once its retention has passed.")
    result_expires_at = serializers.DateTimeField(allow_null=True)
    error = serializers.CharField(allow_null=True, help_text="The last error, if any.")
    snoozes = serializers.IntegerField(help_text="How many times the job snoozed (ran again later, same attempt).")
    batch_id = serializers.IntegerField(allow_null=True, help_text="The batch the job belongs to.")
    parents_waiting = serializers.IntegerField(help_text="How many of its parents have not ended: blocked while > 0.")
    parents = ParentSerializer(many=True)
    children = RelativeSerializer(many=True)
    concurrency = ConcurrencySerializer(allow_null=True, help_text="Its task's concurrency limit, if any.")


class QueueSerializer(serializers.Serializer):
    name = serializers.CharField()
    counts = serializers.DictField(child=serializers.IntegerField())
    paused = serializers.BooleanField()
    paused_at = serializers.DateTimeField(allow_null=True)


class MetricsQuerySerializer(serializers.Serializer):
    hours = serializers.IntegerField(min_value=1, max_value=720, default=24)


class RetryRefusedSerializer(serializers.Serializer):
    """The 409 of a retry (for the schema)."""

    detail = serializers.CharField()
    waiting_job_id = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="The job already waiting with the same queueing lock, when that is the reason.",
    )


class WebhookSecretSerializer(serializers.Serializer):
    secret = serializers.CharField(
        help_text="HMAC-SHA256 key of your completion webhooks' X-Secondbrain-Signature (docs/task-authors.md)."
    )
    created_at = serializers.DateTimeField(help_text="When this secret was made (first use or last rotation).")
