from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings
from procrastinate import JobContext

from core.errors import ProviderError
from digests import services
from jobs import job_task, queues, will_retry
from llm.services import LLM_CONCURRENCY_KEY


@job_task(name="digests.sweep", queue=queues.DIGESTS, cron=settings.DIGEST_SWEEP_CRON, periodic_id="digest-sweep")
def digest_sweep(timestamp: int | None = None) -> int:
    return services.digest_sweep()


@job_task(
    name="digests.weekly_fanout",
    queue=queues.DIGESTS,
    cron=settings.DIGEST_WEEKLY_CRON,
    timezone=settings.DIGEST_WEEKLY_TIMEZONE,
    periodic_id="weekly-digest",
)
def weekly_digest_fanout(timestamp: int) -> int:
    return services.weekly_digest_fanout(period_end=datetime.fromtimestamp(timestamp, UTC))


def _weekly_digest_plain(*, user_id: int, period_end: int, error: Exception) -> int:
    """The last attempt failed: never nothing, write the plain digest."""
    end = datetime.fromtimestamp(period_end, UTC)
    return services.weekly_digest_generate(user_id=user_id, period_end=end, ai_unavailable=f"AI failed: {error}").id


@job_task(
    name="digests.weekly_digest",
    queue=queues.DIGESTS,
    retries=3,  # waits about 5 s, 25 s, 125 s
    retry_base_seconds=5,
    time_limit=lambda: settings.DIGEST_TIME_LIMIT_SECONDS,
    on_time_limit=_weekly_digest_plain,
    pass_context=True,
    # The same slots as the user's note enrichments (both call Claude for that user).
    concurrency=settings.LLM_CONCURRENCY_PER_USER,
    concurrency_key=LLM_CONCURRENCY_KEY,
)
def weekly_digest(context: JobContext, *, user_id: int, period_end: int) -> int:
    try:
        return services.weekly_digest_generate(user_id=user_id, period_end=datetime.fromtimestamp(period_end, UTC)).id
    except ProviderError as exc:
        if will_retry(context, exc):
            raise
        return _weekly_digest_plain(user_id=user_id, period_end=period_end, error=exc)


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
