from __future__ import annotations

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        from core.erasure import erasure_register
        from core.services import purge_register
        from notifications.services import notifications_erase_owner

        erasure_register("notifications", notifications_erase_owner)

        purge_register(
            "notifications", "notifications.services.notifications_purge"
        )  # run by the periodic core.purge_expired
