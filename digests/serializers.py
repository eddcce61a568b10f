from __future__ import annotations

from drf_spectacular.utils import extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from core.fields import TimeZoneField
from core.serializers import ModelSerializer
from digests.models import Frequency, RecipientDigestSchedule, WeeklyDigest
from notes.models import NoteType
from notifications.models import Recipient


@extend_schema_field({"type": "string", "pattern": r"^([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?$", "example": "08:30:00"})
class WallClockTimeField(serializers.TimeField):
    """A time of day without a zone, HH:MM:SS (HH:MM accepted). OpenAPI's `format: time` is
    RFC 3339's, which requires an offset: a validating client would refuse "08:30:00"."""


# The schema keeps the components' names of before the models' rename, for generated clients.
@extend_schema_serializer(component_name="DigestSchedule")
class RecipientDigestScheduleSerializer(ModelSerializer):
    recipient_id = serializers.IntegerField(min_value=1)
    delivery_time = WallClockTimeField(format="%H:%M:%S", input_formats=["%H:%M:%S", "%H:%M"])
    delivery_day = serializers.IntegerField(min_value=1, max_value=31, required=False, allow_null=True)
    max_notes = serializers.IntegerField(min_value=1, max_value=200, required=False)
    note_types = serializers.ListField(child=serializers.ChoiceField(choices=NoteType.choices), required=False)
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False, max_length=50)
    timezone = TimeZoneField(required=False)

    class Meta:
        model = RecipientDigestSchedule
        fields = [
            "id",
            "recipient_id",
            "frequency",
            "delivery_time",
            "delivery_day",
            "timezone",
            "active",
            "max_notes",
            "note_types",
            "tags",
            "last_digest_sent",
            "next_digest_scheduled",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "last_digest_sent", "next_digest_scheduled", "created_at", "updated_at"]

    def validate_recipient_id(self, value: int) -> Recipient:
        recipient = Recipient.objects.filter(owner=self.context["request"].user, id=value).first()
        if recipient is None:
            raise serializers.ValidationError("Unknown recipient.")
        return recipient

    def validate_tags(self, value: list[str]) -> list[str]:
        return list(dict.fromkeys(tag.lstrip("#").lower() for tag in value if tag.strip("# ")))

    def validate(self, attrs: dict) -> dict:
        frequency = attrs.get("frequency", getattr(self.instance, "frequency", None))
        day = attrs.get("delivery_day", getattr(self.instance, "delivery_day", None))
        if frequency == Frequency.WEEKLY and not (day and 1 <= day <= 7):
            raise serializers.ValidationError({"delivery_day": "Weekly digests need a day from 1 (Monday) to 7."})
        if frequency == Frequency.MONTHLY and not day:
            raise serializers.ValidationError({"delivery_day": "Monthly digests need a day of the month, 1 to 31."})
        if frequency == Frequency.DAILY and attrs.get("delivery_day") is not None:
            raise serializers.ValidationError({"delivery_day": "Daily digests take no delivery day."})
        if "recipient_id" in attrs:
            attrs["recipient"] = attrs.pop("recipient_id")
        return attrs


@extend_schema_serializer(component_name="Digest")
class WeeklyDigestSerializer(ModelSerializer):
    class Meta:
        model = WeeklyDigest
        fields = [
            "id",
            "period_start",
            "period_end",
            "content",
            "ai_generated",
            "fallback_reason",
            "note_count",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "generated_at",
        ]
