"""The right to erasure: deleting a user deletes everything of theirs, in one transaction.

Django's cascades delete the rows that have a foreign key to the user (notes, imports and their
files, recipients, notifications and their delivery logs, digests, idempotency records, job
info). What has none is erased by the app that owns it: the job rows with their arguments,
events, progress and results (jobs), counters kept under a name (quotas, throttles). Each app
registers its eraser in its AppConfig.ready(); they run from the user's `pre_delete` signal,
inside the deletion's own transaction, so the admin's delete, `user.delete()` and
`POST /api/auth/erase/` all erase the same, and a deletion that fails leaves everything in place.

Erasers take the user's id and must not fail on a user with nothing to erase.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models.signals import pre_delete
from rest_framework.settings import api_settings

from core.throttling import throttle_buckets_erase

logger = logging.getLogger(__name__)

_ERASERS: dict[str, Callable[[int], None]] = {}


def erasure_register(name: str, eraser: Callable[[int], None]) -> None:
    """Call `eraser(user_id)` inside the transaction that deletes a user."""
    _ERASERS[name] = eraser


def user_erase(*, user: AbstractBaseUser) -> None:
    """Delete the user and everything of theirs (see the module's docstring)."""
    with transaction.atomic():
        user.delete()


def _throttle_counters_erase(user_id: int) -> None:
    """The user's throttle buckets (DRF's key: scope and user id, core/throttling.py)."""
    keys = [
        throttle_class.cache_format % {"scope": throttle_class.scope, "ident": user_id}
        for throttle_class in api_settings.DEFAULT_THROTTLE_CLASSES
        if getattr(throttle_class, "scope", None)
    ]
    throttle_buckets_erase(keys)


def _run_erasers(sender, instance: AbstractBaseUser, **kwargs) -> None:
    for eraser in _ERASERS.values():
        eraser(instance.pk)
    logger.info("Erased user %s: %s", instance.pk, ", ".join(_ERASERS) or "nothing registered")


def erasure_connect() -> None:
    """Run the erasers whenever a user is deleted (CoreConfig.ready)."""
    erasure_register("core.throttles", _throttle_counters_erase)
    pre_delete.connect(_run_erasers, sender=get_user_model(), dispatch_uid="core.erasure")
