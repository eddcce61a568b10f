"""Writes of the cross-app pieces in core/: idempotency keys and the database cache's upkeep."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from core.models import IdempotencyKey

logger = logging.getLogger(__name__)

# The lock is taken with try: a request that finds the key's first request still running is
# told so (409) instead of queueing behind it. Namespaced so it never meets another lock.
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"


def idempotency_key_lock(*, user_id: int, key: str) -> tuple[bool, IdempotencyKey | None]:
    """Take the transaction-level lock on (user, key); then return its live stored response.

    Returns (False, None) when another transaction holds the lock (its request is still
    running), else (True, the unexpired row or None). An expired row is deleted here, so the
    key is free again. Call inside transaction.atomic(): the lock lasts until that commit.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("idempotency_key_lock must run inside transaction.atomic()")
    with connection.cursor() as cursor:
        cursor.execute(_TRY_LOCK, [f"idempotency-key:{user_id}:{key}"])
        if not cursor.fetchone()[0]:
            return False, None
    stored = IdempotencyKey.objects.filter(user_id=user_id, key=key).first()
    if stored is not None and stored.expires_at <= timezone.now():
        stored.delete()
        stored = None
    return True, stored


def idempotency_key_store(
    *, user_id: int, key: str, method: str, path: str, request_hash: str, status: int, body: str
) -> IdempotencyKey:
    """Keep a response under its key. Call holding idempotency_key_lock, in the transaction of
    the work the response reports, so the two commit (or vanish) together."""
    now = timezone.now()
    return IdempotencyKey.objects.create(
        user_id=user_id,
        key=key,
        method=method,
        path=path,
        request_hash=request_hash,
        response_status=status,
        response_body=body,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS),
    )


# Batches in their own short transactions, skipping rows someone holds (as jobs_purge does).
_PURGE_KEYS = """
DELETE FROM core_idempotency_keys WHERE id IN (
    SELECT id FROM core_idempotency_keys WHERE expires_at < now() LIMIT %s FOR UPDATE SKIP LOCKED
)
"""
_PURGE_CACHE = """
DELETE FROM core_cache WHERE cache_key IN (
    SELECT cache_key FROM core_cache WHERE expires < now() LIMIT %s FOR UPDATE SKIP LOCKED
)
"""
# Throttle buckets whose time has passed: full, the same as no row (core/throttling.py).
_PURGE_THROTTLE_BUCKETS = """
DELETE FROM core_throttle_buckets WHERE key IN (
    SELECT key FROM core_throttle_buckets WHERE tat < now() LIMIT %s FOR UPDATE SKIP LOCKED
)
"""
# Past days' quota counters (core/quotas.py): yesterday's is kept for a look at the day before.
_PURGE_QUOTAS = """
DELETE FROM core_quota_counters WHERE id IN (
    SELECT id FROM core_quota_counters WHERE day < (now() AT TIME ZONE 'UTC')::date - 1
     LIMIT %s FOR UPDATE SKIP LOCKED
)
"""


# The purges of the domain apps, run by core.purge_expired: each app registers its own in its
# AppConfig.ready(), by dotted path (imported when the purge runs), so core imports none of them
# and one periodic job does every purge.
_APP_PURGES: dict[str, str] = {}


def purge_register(name: str, purge_path: str) -> None:
    """Run the function at `purge_path` (batched, returning {what: rows}) with every
    core.purge_expired."""
    _APP_PURGES[name] = purge_path


def expired_rows_purge(*, batch_size: int = 1000, max_batches: int = 1000) -> dict[str, int]:
    """Delete expired idempotency keys, expired database-cache rows, full throttle buckets, the
    quota counters of past days, and whatever the apps registered (purge_register).

    Expired keys are already ignored when looked up; this only keeps the tables small. Runs
    periodically as `core.purge_expired` (JOBS_RETENTION_CRON)."""
    deleted: dict[str, int] = {}
    with connection.cursor() as cursor:
        for name, statement in (
            ("idempotency_keys", _PURGE_KEYS),
            ("cache", _PURGE_CACHE),
            ("throttle_buckets", _PURGE_THROTTLE_BUCKETS),
            ("quota_counters", _PURGE_QUOTAS),
        ):
            total = 0
            for _ in range(max_batches):
                with transaction.atomic():
                    cursor.execute(statement, [batch_size])
                    total += cursor.rowcount
                if cursor.rowcount < batch_size:
                    break
            deleted[name] = total
    failed: list[Exception] = []
    for app_name, purge_path in _APP_PURGES.items():
        try:
            purge: Callable[[], dict[str, int]] = import_string(purge_path)
            deleted.update({f"{app_name}.{what}": count for what, count in purge().items()})
        except Exception as exc:  # one app's failure does not keep the others' rows
            logger.exception("The purge of %s failed", app_name)
            failed.append(exc)
    if any(deleted.values()):
        logger.info("Purged expired rows: %s", deleted)
    if failed:
        raise failed[0]
    return deleted
