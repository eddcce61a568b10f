from __future__ import annotations

from django.db import models


class RateLimitBucket(models.Model):
    """A token bucket shared by every process: `tokens` as of `updated_at`, refilled on read."""

    key = models.CharField(max_length=200, primary_key=True)
    tokens = models.FloatField()
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "jobs_rate_limit_buckets"

    def __str__(self) -> str:
        return self.key


class CircuitBreaker(models.Model):
    """Shared state of a circuit breaker in front of an external service."""

    class State(models.TextChoices):
        CLOSED = "closed"
        OPEN = "open"
        HALF_OPEN = "half_open"

    name = models.CharField(max_length=100, primary_key=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.CLOSED)
    consecutive_failures = models.PositiveIntegerField(default=0)
    opened_until = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "jobs_circuit_breakers"

    def __str__(self) -> str:
        return f"{self.name}: {self.state}"
