from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from notes.models import Note, NoteImport


@admin.register(Note)
class NoteAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "title", "note_type", "enrichment_status", "word_count", "created_at")
    list_filter = ("enrichment_status", "note_type")
    search_fields = ("title", "content")
    readonly_fields = ("content_version", "enriched_at", "created_at", "updated_at")
    raw_id_fields = ("owner",)


@admin.register(NoteImport)
class NoteImportAdmin(admin.ModelAdmin):
    """Read-only: imports are made through the API and run by their job. Deleting one keeps
    the notes it created and frees its stored file."""

    list_display = (
        "id",
        "owner",
        "filename",
        "format",
        "status",
        "total",
        "rows_done",
        "imported",
        "skipped",
        "created_at",
    )
    list_filter = ("status", "format")
    search_fields = ("filename", "owner__username")
    exclude = ("data",)  # the file itself: never loaded into a page
    raw_id_fields = ("owner",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: NoteImport | None = None) -> bool:
        return False
