"""GET /metrics in Prometheus text format.

A custom collector on its own registry reads every value from PostgreSQL at scrape time, so
all web processes report the same numbers and nothing is kept in process memory. Counters
(e-mails, LLM calls, tokens and spend) are rows kept by triggers on the inserts, read in a few
rows whatever the size of the tables, and retention purges never lower them; the job-duration
histogram covers the runs that ended in the last JOB_DURATION_WINDOW_SECONDS, so it can go down
as runs leave the window (use it for quantiles, not rate()).

With settings.METRICS_TOKEN set, a scrape needs `Authorization: Bearer <token>`; without one
it is refused (403) unless DEBUG or METRICS_PUBLIC is on. One collection per process serves
every scrape within METRICS_CACHE_SECONDS: fifty scrapers at once cost one set of aggregates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from core.operators import metrics_token_given
from jobs import queues
from jobs.console import selectors
from llm import selectors as llm_selectors
from notifications import selectors as notification_selectors
from notifications.services import EMAIL_BREAKER

JOB_STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborted")
JOB_DURATION_WINDOW_SECONDS = 24 * 3600
JOB_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
# Breakers reported as closed before their first failure writes a row.
KNOWN_BREAKERS = (EMAIL_BREAKER,)


class SecondbrainCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._job_durations()
        yield from self._attempts()
        yield from self._queues_and_workers()
        yield from self._emails()
        yield from self._llm()
        yield from self._breakers()

    def _jobs(self) -> Iterator[Metric]:
        counts = selectors.job_counts_by_queue()
        family = GaugeMetricFamily(
            "secondbrain_jobs", "Jobs in the queue table by queue and status.", labels=["queue", "status"]
        )
        for queue in list(queues.ALL) + sorted(set(counts) - set(queues.ALL)):
            by_status = counts.get(queue, {})
            for status in JOB_STATUSES:
                family.add_metric([queue, status], by_status.get(status, 0))
        yield family

    def _job_durations(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "secondbrain_job_duration_seconds",
            "Run time (started to succeeded, failed or aborted) of the job runs that ended in the last 24 hours.",
            labels=["task"],
        )
        for row in selectors.dashboard_run_histogram(seconds=JOB_DURATION_WINDOW_SECONDS, buckets=JOB_DURATION_BUCKETS):
            buckets = [(_bound(le), count) for le, count in zip(JOB_DURATION_BUCKETS, row["buckets"], strict=True)]
            buckets.append(("+Inf", row["count"]))
            family.add_metric([row["task"]], buckets, sum_value=row["sum"])
        yield family

    def _attempts(self) -> Iterator[Metric]:
        family = SummaryMetricFamily(
            "secondbrain_job_attempts",
            "Attempts spent by the jobs in the queue table, per task (count: jobs, sum: attempts).",
            labels=["task"],
        )
        for task, jobs, attempts in selectors.job_attempts_by_task():
            family.add_metric([task], count_value=jobs, sum_value=attempts)
        yield family

    def _queues_and_workers(self) -> Iterator[Metric]:
        paused = selectors.paused_queue_names()
        family = GaugeMetricFamily("secondbrain_queue_paused", "1 while the queue is paused.", labels=["queue"])
        for queue in sorted(set(queues.ALL) | paused):
            family.add_metric([queue], 1 if queue in paused else 0)
        yield family
        workers = selectors.live_workers(stalled_after_seconds=settings.WORKER_STALLED_SECONDS)
        yield GaugeMetricFamily(
            "secondbrain_workers_live", "Workers with a heartbeat within WORKER_STALLED_SECONDS.", value=len(workers)
        )

    def _emails(self) -> Iterator[Metric]:
        by_outcome = notification_selectors.delivery_counts_by_every_outcome()
        family = CounterMetricFamily(
            "secondbrain_email_deliveries",
            "E-mail delivery attempts by outcome (sent, transient_failure, permanent_failure, ...).",
            labels=["outcome"],
        )
        for outcome, count in by_outcome.items():
            family.add_metric([outcome], count)
        yield family
        family = GaugeMetricFamily(
            "secondbrain_notifications", "Notification jobs waiting or running, by status.", labels=["status"]
        )
        for status, count in notification_selectors.notification_counts_unfinished().items():
            family.add_metric([status], count)
        yield family

    def _llm(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "secondbrain_llm_calls", "Claude calls recorded in the ledger.", labels=["purpose", "model"]
        )
        tokens = CounterMetricFamily(
            "secondbrain_llm_tokens", "Claude tokens recorded in the ledger.", labels=["purpose", "model", "direction"]
        )
        spend = CounterMetricFamily(
            "secondbrain_llm_spend_usd",
            "Claude spend in US dollars recorded in the ledger.",
            labels=["purpose", "model"],
        )
        for row in llm_selectors.llm_usage_totals():
            labels = [row["purpose"], row["model"]]
            calls.add_metric(labels, int(row["calls"]))
            tokens.add_metric([*labels, "input"], int(row["input_tokens"]))
            tokens.add_metric([*labels, "output"], int(row["output_tokens"]))
            spend.add_metric(labels, float(row["cost_usd"]))
        yield from (calls, tokens, spend)

    def _breakers(self) -> Iterator[Metric]:
        states = dict.fromkeys(KNOWN_BREAKERS, "closed")
        states.update(selectors.circuit_breaker_states())
        family = GaugeMetricFamily(
            "secondbrain_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["name"],
        )
        for name, state in sorted(states.items()):
            family.add_metric([name], BREAKER_STATE_VALUES.get(state, 2))
        yield family


def _bound(le: float) -> str:
    return repr(float(le))


# Its own registry: the default one would add this process's own metrics, which differ between
# web processes. auto_describe=False keeps registration from querying the database at import.
REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(SecondbrainCollector())


class _CachedScrape:
    """The last collection's text and when it was taken. The lock makes concurrent scrapes
    wait for the collection in progress instead of each running its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken_at = float("-inf")
        self._text = b""

    def text(self, *, max_age_seconds: float) -> bytes:
        with self._lock:
            if time.monotonic() - self._taken_at >= max_age_seconds:
                self._text = generate_latest(REGISTRY)
                self._taken_at = time.monotonic()
            return self._text

    def clear(self) -> None:
        with self._lock:
            self._taken_at = float("-inf")


SCRAPES = _CachedScrape()


def _refusal(request: HttpRequest) -> HttpResponse | None:
    if settings.METRICS_TOKEN:
        if metrics_token_given(request):
            return None
        response = HttpResponse("A valid bearer token is required.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if settings.DEBUG or settings.METRICS_PUBLIC:
        return None
    return HttpResponse(
        "Metrics are not public: set METRICS_TOKEN (and send it as a bearer token), or METRICS_PUBLIC=true.\n",
        status=403,
        content_type="text/plain",
    )


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    body = SCRAPES.text(max_age_seconds=settings.METRICS_CACHE_SECONDS)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
