from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from core.fields import StrictCharField
from notes.models import Note


class NoteInputSerializer(serializers.Serializer):
    content = StrictCharField(trim_whitespace=False)
    title = StrictCharField(max_length=200, required=False, allow_blank=True)

    def validate_content(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("This field may not be blank.")
        size = len(value.encode("utf-8"))
        limit = settings.NOTE_MAX_CONTENT_BYTES
        if size > limit:
            raise serializers.ValidationError(f"Content is {size} bytes; the limit is {limit} bytes.")
        return value


class NoteOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Note
        fields = [
            "id",
            "title",
            "content",
            "word_count",
            "tags",
            "links",
            "note_type",
            "enrichment_status",
            "enrichment_error",
            "ai_type",
            "ai_tags",
            "summary",
            "connections",
            "enriched_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields
