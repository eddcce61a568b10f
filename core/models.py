from __future__ import annotations

from django.conf import settings
from django.db import models


class IdempotencyKey(models.Model):
    """The response to a POST sent with an `Idempotency-Key` header (see core/idempotency.py).

    A row exists only for a request whose work committed: it is inserted in the same transaction.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    method = models.CharField(max_length=10)
    path = models.TextField()
    # sha256 of the query string and the parsed body (files by their content's hash).
    request_hash = models.CharField(max_length=64)
    response_status = models.PositiveSmallIntegerField()
    response_body = models.TextField(help_text="The response data as JSON text, in its original key order.")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "core_idempotency_keys"
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="core_idempotency_key_per_user")]

    def __str__(self) -> str:
        return f"{self.method} {self.path} [{self.key}]"


class QuotaCounter(models.Model):
    """How much of a daily quota one key (e.g. "email:42") has used on one UTC day (see
    core/quotas.py). Rows of past days are only history; the periodic purge drops them."""

    key = models.CharField(max_length=200)
    day = models.DateField()
    used = models.DecimalField(max_digits=20, decimal_places=6, default=0)

    class Meta:
        db_table = "core_quota_counters"
        constraints = [models.UniqueConstraint(fields=["key", "day"], name="core_quota_counter_key_day")]

    def __str__(self) -> str:
        return f"{self.key} on {self.day}: {self.used}"


class ThrottleBucket(models.Model):
    """One API client's throttle (core/throttling.py): the time its bucket is next empty. A row
    of constant size whatever the rate; one whose time has passed is a full bucket, the same as
    no row, and the periodic purge drops it."""

    key = models.CharField(max_length=255, primary_key=True)  # DRF's key: scope and user id or address
    tat = models.DateTimeField(help_text="The theoretical arrival time of the next request (GCRA).")

    class Meta:
        db_table = "core_throttle_buckets"

    def __str__(self) -> str:
        return f"{self.key} until {self.tat}"
