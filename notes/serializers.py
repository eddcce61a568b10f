from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.errors import ApplicationError
from core.fields import StrictCharField
from core.serializers import ModelSerializer, SharedFields
from jobs import webhook_url_check
from notes import import_formats
from notes.models import IMPORT_ENRICHED, ImportFormat, ImportStatus, Note, NoteImport, NoteType
from notes.selectors import note_import_enrichment


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


class NoteOutputSerializer(SharedFields, ModelSerializer):
    # Declared so the schema says it may be blank (a read-only model field loses allow_blank).
    ai_type = serializers.ChoiceField(
        choices=NoteType.choices, allow_blank=True, read_only=True, help_text="Claude's type; empty until enriched."
    )

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


class NoteImportInputSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=False)
    format = serializers.ChoiceField(choices=ImportFormat.choices, required=False)
    callback_url = serializers.URLField(required=False, max_length=2000)
    notify_email = serializers.BooleanField(
        required=False,
        default=False,
        help_text="E-mail you once every imported note's enrichment has ended, with the counts.",
    )

    def validate_notify_email(self, value: bool) -> bool:
        owner = self.context.get("owner")
        if value and owner is not None and not owner.email:
            raise serializers.ValidationError("Your account has no e-mail address to send it to.")
        return value

    def validate_file(self, value: UploadedFile) -> UploadedFile:
        limit = settings.IMPORTS_MAX_UPLOAD_BYTES
        if value.size > limit:
            raise upload_too_large(value.size)
        return value

    def validate_callback_url(self, value: str) -> str:
        try:
            webhook_url_check(value)
        except ApplicationError as exc:
            raise serializers.ValidationError(exc.extra.get("callback_url", [exc.message])) from exc
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        upload: UploadedFile = attrs["file"]
        fmt = attrs.get("format") or import_formats.format_infer(
            filename=upload.name or "", content_type=upload.content_type
        )
        if fmt is None:
            raise serializers.ValidationError(
                {"format": ["Cannot tell the format from the file name or type: send format=csv or format=jsonl."]}
            )
        try:
            import_formats.file_check(upload, fmt)
        except import_formats.ImportFileError as exc:
            raise serializers.ValidationError({"file": [str(exc)]}) from exc
        return {**attrs, "format": fmt}


def upload_too_large(size: int | None) -> ApplicationError:
    limit = settings.IMPORTS_MAX_UPLOAD_BYTES
    message = f"The file is larger than the limit of {limit} bytes."
    if size is not None:
        message = f"The file is {size} bytes; the limit is {limit} bytes."
    return ApplicationError("File too large.", status_code=413, extra={"file": [message]})


class _Enrichment(serializers.Serializer):
    state = serializers.CharField()
    total = serializers.IntegerField()
    done = serializers.IntegerField()
    succeeded = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField()


class NoteImportOutputSerializer(ModelSerializer):
    processed = serializers.IntegerField(source="rows_done")
    errors = serializers.SerializerMethodField()
    status = serializers.SerializerMethodField()
    enrichment = serializers.SerializerMethodField()

    class Meta:
        model = NoteImport
        fields = [
            "id",
            "filename",
            "format",
            "size",
            "status",
            "total",
            "processed",
            "imported",
            "duplicates",
            "skipped",
            "errors",
            "enrichment",
            "notify_email",
            "email_notification_id",
            "failure_reason",
            "job_id",
            "created_at",
            "started_at",
            "finished_at",
            "file_deleted_at",
        ]
        read_only_fields = fields

    ERRORS_SHOWN = 100

    def _enrichment(self, note_import: NoteImport) -> dict[str, Any] | None:
        cache = self.context.setdefault("enrichment", {})
        if note_import.id not in cache:
            cache[note_import.id] = note_import_enrichment(import_id=note_import.id)
        return cache[note_import.id]

    @extend_schema_field(serializers.ChoiceField(choices=[*ImportStatus.values, IMPORT_ENRICHED]))
    def get_status(self, note_import: NoteImport) -> str:
        """`done` once the rows are in; `enriched` once every inserted note's enrichment ended."""
        enrichment = self._enrichment(note_import)
        if note_import.status == ImportStatus.DONE and enrichment and enrichment["state"] == "done":
            return IMPORT_ENRICHED
        return note_import.status

    @extend_schema_field(_Enrichment(allow_null=True))
    def get_enrichment(self, note_import: NoteImport) -> dict[str, Any] | None:
        """The enrichment of the notes inserted: `state` (`open` while rows are read, `sealed`,
        `done`), `total`, `done`, `succeeded`, `failed`, `cancelled`; null for an older import."""
        return self._enrichment(note_import)

    def get_errors(self, note_import: NoteImport) -> list[dict[str, Any]]:
        """The first skipped rows, {"line": n, "reason": "..."}; `skipped` counts them all."""
        return note_import.errors[: self.ERRORS_SHOWN]
