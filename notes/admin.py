from django.contrib import admin

from notes.models import Note


@admin.register(Note)
class NoteAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "title", "note_type", "enrichment_status", "word_count", "created_at")
    list_filter = ("enrichment_status", "note_type")
    search_fields = ("title", "content")
    readonly_fields = ("content_version", "enriched_at", "created_at", "updated_at")
    raw_id_fields = ("owner",)
