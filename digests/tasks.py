from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings
from procrastinate import JobContext
from procrastinate.contrib.django import app

from core.errors import ProviderError
from digests import services
from jobs import TimeLimitExceeded, call_with_time_limit, job_task, queues, will_retry


@app.periodic(cron=settings.DIGEST_SWEEP_CRON, periodic_id="digest-sweep")
@app.task(name="digests.sweep", queue=queues.DIGESTS)
def digest_sweep(timestamp: int | None = None) -> int:
    return services.digest_sweep()


@app.periodic(cron=settings.DIGEST_WEEKLY_CRON, periodic_id="weekly-digest")
@app.task(name="digests.weekly_fanout", queue=queues.DIGESTS)
def weekly_digest_fanout(timestamp: int) -> int:
    return services.weekly_digest_fanout(period_end=datetime.fromtimestamp(timestamp, UTC))


@job_task(
    name="digests.weekly_digest",
    queue=queues.DIGESTS,
    retries=3,  # waits about 5 s, 25 s, 125 s
    retry_base_seconds=5,
    pass_context=True,
)
def weekly_digest(context: JobContext, *, user_id: int, period_end: int) -> int:
    end = datetime.fromtimestamp(period_end, UTC)
    try:
        digest = call_with_time_limit(
            services.weekly_digest_generate, seconds=settings.DIGEST_TIME_LIMIT_SECONDS, user_id=user_id, period_end=end
        )
    except (ProviderError, TimeLimitExceeded) as exc:
        if will_retry(context, exc):
            raise
        # The last attempt: never nothing, write the plain digest.
        digest = services.weekly_digest_generate(user_id=user_id, period_end=end, ai_unavailable=f"AI failed: {exc}")
    return digest.id


@job_task(name="digests.weekly_run_record", queue=queues.DIGESTS, result_ttl=90 * 24 * 3600)
def weekly_digest_run_record(
    *, period_end: int, batch_id: int, total: int, succeeded: int, failed: int, cancelled: int
) -> dict:
    """The callback of the weekly fan-out's batch: records the run (its result, kept 90 days)."""
    return services.weekly_digest_run_record(
        period_end=datetime.fromtimestamp(period_end, UTC),
        batch_id=batch_id,
        total=total,
        succeeded=succeeded,
        failed=failed,
        cancelled=cancelled,
    )
