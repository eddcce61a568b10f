from __future__ import annotations

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        from core.services import purge_register

        purge_register(
            "notifications", "notifications.services.notifications_purge"
        )  # run by the periodic core.purge_expired
