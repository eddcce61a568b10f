from __future__ import annotations

from django.apps import AppConfig


class NotesConfig(AppConfig):
    name = "notes"
    verbose_name = "Notes"

    def ready(self) -> None:
        from core.services import purge_register

        # Run by the periodic core.purge_expired (core never imports this app).
        purge_register("notes", "notes.services.note_import_files_purge")
