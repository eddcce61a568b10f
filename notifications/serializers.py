from __future__ import annotations

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema_serializer
from rest_framework import serializers

from core.fields import StrictCharField, TimeZoneField
from core.serializers import ModelSerializer
from jobs import webhook_url_problem
from notifications.models import DeliveryLog, DeliveryMethod, NotificationJob, NotificationType, Priority, Recipient


class RecipientSerializer(ModelSerializer):
    name = StrictCharField(max_length=200)
    relationship = StrictCharField(max_length=50, required=False, allow_blank=True)
    timezone = TimeZoneField(required=False)

    class Meta:
        model = Recipient
        fields = [
            "id",
            "name",
            "email",
            "relationship",
            "timezone",
            "muted_until",
            "muted_indefinitely",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]


def _validate_size(value: str, limit: int) -> str:
    size = len(value.encode("utf-8"))
    if size > limit:
        raise serializers.ValidationError(f"{size} bytes; the limit is {limit} bytes.")
    return value


_OWNED_RECIPIENTS = f"SELECT * FROM {Recipient._meta.db_table} WHERE owner_id = %s AND id = ANY(%s)"


class _SendBase(serializers.Serializer):
    subject = StrictCharField(max_length=998)
    body = StrictCharField(trim_whitespace=False)
    notification_type = serializers.ChoiceField(choices=NotificationType.choices, default=NotificationType.SYSTEM)
    delivery_method = serializers.ChoiceField(choices=DeliveryMethod.choices, default=DeliveryMethod.EMAIL)
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.NORMAL)
    scheduled_for = serializers.DateTimeField(required=False, allow_null=True)

    def validate_subject(self, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise serializers.ValidationError("The subject must be a single line.")
        return value

    def validate_body(self, value: str) -> str:
        return _validate_size(value, settings.NOTIFICATIONS_MAX_BODY_BYTES)

    def validate_delivery_method(self, value: str) -> str:
        if value != DeliveryMethod.EMAIL:
            raise serializers.ValidationError(f"Delivery by {value} is not supported yet; use email.")
        return value

    def validate_scheduled_for(self, value):
        # A time in the past means "now"; it still goes through the queue.
        return value if value is None or value > timezone.now() else None

    def _owned_recipients(self, ids: list[int]) -> dict[int, Recipient]:
        owner = self.context["request"].user
        # Django's raw(), not filter(): the ORM's compiling of the query cost 676 µs of CPU, the
        # raw query's 224 (docs/performance.md, levers of 2026-12-08). Unsorted: a dict.
        return {r.id: r for r in Recipient.objects.raw(_OWNED_RECIPIENTS, [owner.pk, ids])}


class SendEmailSerializer(_SendBase):
    recipient_id = serializers.IntegerField(min_value=1)
    callback_url = serializers.URLField(
        max_length=2000,
        required=False,
        help_text="POSTed the job's final status when it ends: https, on a host in JOBS_WEBHOOK_ALLOWED_HOSTS"
        " that resolves to public addresses only (see docs/task-authors.md, completion webhooks).",
    )

    def validate_callback_url(self, value: str) -> str:
        problem = webhook_url_problem(value)
        if problem is not None:
            raise serializers.ValidationError(problem)
        return value

    def validate_recipient_id(self, value: int) -> Recipient:
        recipient = self._owned_recipients([value]).get(value)
        if recipient is None:
            raise serializers.ValidationError("Unknown recipient.")
        return recipient


class SendBulkSerializer(_SendBase):
    recipient_ids = serializers.ListField(child=serializers.IntegerField(min_value=1), allow_empty=False)

    def validate_recipient_ids(self, value: list[int]) -> list[Recipient]:
        limit = settings.NOTIFICATIONS_MAX_BULK_RECIPIENTS
        if len(value) > limit:
            raise serializers.ValidationError(f"At most {limit} recipients per request.")
        unique = list(dict.fromkeys(value))
        found = self._owned_recipients(unique)
        unknown = [i for i in unique if i not in found]
        if unknown:
            raise serializers.ValidationError(f"Unknown recipients: {unknown[:20]}")
        return [found[i] for i in unique]


class DeliveryLogSerializer(ModelSerializer):
    class Meta:
        model = DeliveryLog
        fields = ["attempt", "outcome", "error", "provider_response", "duration_ms", "created_at"]


class NotificationJobSerializer(ModelSerializer):
    class Meta:
        model = NotificationJob
        fields = [
            "id",
            "recipient_id",
            "notification_type",
            "delivery_method",
            "priority",
            "status",
            "scheduled_for",
            "retry_count",
            "provider_message_id",
            "error",
            "procrastinate_job_id",
            "created_at",
            "started_at",
            "processed_at",
        ]


class NotificationJobDetailSerializer(NotificationJobSerializer):
    recipient = RecipientSerializer()
    payload = serializers.JSONField()
    delivery_logs = DeliveryLogSerializer(many=True)
    processing_time_ms = serializers.SerializerMethodField()
    seconds_until_scheduled = serializers.SerializerMethodField()

    class Meta(NotificationJobSerializer.Meta):
        fields = [
            *NotificationJobSerializer.Meta.fields,
            "recipient",
            "payload",
            "delivery_logs",
            "processing_time_ms",
            "seconds_until_scheduled",
        ]

    def get_processing_time_ms(self, obj: NotificationJob) -> float | None:
        if obj.processed_at is None:
            return None
        due = max(obj.created_at, obj.scheduled_for or obj.created_at)
        return round((obj.processed_at - due).total_seconds() * 1000, 1)

    def get_seconds_until_scheduled(self, obj: NotificationJob) -> float | None:
        if obj.scheduled_for is None:
            return None
        return max(0.0, round((obj.scheduled_for - timezone.now()).total_seconds(), 1))


class MetricsQuerySerializer(serializers.Serializer):
    hours = serializers.IntegerField(min_value=1, max_value=24 * 90, default=24)


# Responses of send-email and send-bulk. `job_id`/`job_ids` were the notifications' ids under a
# misleading name (a queue job's id is `procrastinate_job_id`): kept with the same values, deprecated,
# until the next release removes them.
@extend_schema_serializer(deprecate_fields=["job_id"], component_name="Queued")
class QueuedSerializer(serializers.Serializer):
    notification_id = serializers.IntegerField(help_text="The notification's id in /api/notifications/jobs/.")
    job_id = serializers.IntegerField(help_text="Deprecated: the same value as notification_id.")
    status = serializers.CharField()
    message = serializers.CharField()


@extend_schema_serializer(deprecate_fields=["job_ids"], component_name="BulkQueued")
class BulkQueuedSerializer(serializers.Serializer):
    notification_ids = serializers.ListField(child=serializers.IntegerField())
    job_ids = serializers.ListField(
        child=serializers.IntegerField(), help_text="Deprecated: the same value as notification_ids."
    )
    status = serializers.CharField()
    message = serializers.CharField()
