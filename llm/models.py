from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models.functions import Now


class LlmUsage(models.Model):
    """The ledger: one row per Claude call that was billed, with its tokens and cost.

    `estimated`: the call timed out after it was sent, so its tokens are the worst case (the
    request's estimated input and every output token it allowed), not Claude's count."""

    # The database's clock, as the budget's month boundary (llm/selectors.py).
    created_at = models.DateTimeField(db_default=Now(), db_index=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    purpose = models.CharField(max_length=50)  # e.g. "note_enrichment", "weekly_digest"
    model = models.CharField(max_length=100)
    input_tokens = models.PositiveIntegerField()
    output_tokens = models.PositiveIntegerField()
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6)
    estimated = models.BooleanField(default=False, db_default=False)

    class Meta:
        db_table = "llm_usage"
        ordering = ["-created_at"]
        verbose_name_plural = "LLM usage"

    def __str__(self) -> str:
        return f"{self.purpose} {self.model} ${self.cost_usd}"


class LlmUsageCounter(models.Model):
    """The ledger's totals by purpose and model, for /metrics: a statement-level trigger on
    llm_usage (migration 0004) adds each INSERT's rows in the same transaction, so a scrape sums
    a few rows instead of the ledger, and deleting ledger rows never lowers it. Spread over a few
    shards (the writer's backend pid) so concurrent callers don't queue on one row lock."""

    purpose = models.CharField(max_length=50)
    model = models.CharField(max_length=100)
    shard = models.SmallIntegerField()
    calls = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=20, decimal_places=6, default=0)

    class Meta:
        db_table = "llm_usage_counters"
        constraints = [
            models.UniqueConstraint(fields=["purpose", "model", "shard"], name="llm_usage_counter_key"),
        ]

    def __str__(self) -> str:
        return f"{self.purpose} {self.model}[{self.shard}]: {self.calls}"
