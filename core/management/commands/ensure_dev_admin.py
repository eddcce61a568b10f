from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

USERNAME = "admin"
PASSWORD = "admin"


class Command(BaseCommand):
    help = "Development only: make sure an admin user exists and print its credentials."

    def handle(self, *args, **options) -> None:
        if not settings.DEBUG:
            raise CommandError("ensure_dev_admin only runs with DEBUG on (development)")
        User = get_user_model()
        if not User.objects.filter(username=USERNAME).exists():
            User.objects.create_superuser(USERNAME, "admin@localhost", PASSWORD)
            self.stdout.write(f"Created the development admin user {USERNAME!r}.")
        self.stdout.write(f"Development admin: username {USERNAME!r}, password {PASSWORD!r} (development only)")
