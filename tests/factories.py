from __future__ import annotations

from django.contrib.auth import get_user_model


def make_user(username: str, *, password: str = "correct-horse-battery", **extra):
    return get_user_model().objects.create_user(username=username, password=password, **extra)


def make_recipient(owner, *, name: str = "Rita", email: str = "rita@example.com", **extra):
    from notifications.models import Recipient

    return Recipient.objects.create(owner=owner, name=name, email=email, **extra)
