"""GET /api/health/: healthy or not, with the reasons, read from every app's selectors."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import DatabaseError
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from core.operators import may_read_operations
from jobs import breaker_state
from jobs.console.selectors import job_counts_by_queue, live_worker_exists, live_workers
from llm.selectors import llm_budget_usd, llm_spend_this_month
from notifications.selectors import notification_health
from notifications.services import EMAIL_BREAKER

logger = logging.getLogger(__name__)


class HealthApi(APIView):
    """Healthy or not, with the reasons; 503 when unhealthy.

    Anyone (load balancers, monitors) gets the summary: database up or down and whether a worker
    is alive, from one indexed query, and nothing about the infrastructure (the database's error
    names its host, address and user: it goes to the log). Staff, or a caller with the
    METRICS_TOKEN bearer token, get the details: jobs per queue, worker ids, LLM budget, mail."""

    permission_classes = [AllowAny]
    # Token and session, to recognise staff; a caller without credentials stays anonymous.
    authentication_classes = api_settings.DEFAULT_AUTHENTICATION_CLASSES
    # Load balancers and monitors poll it from one address: never answer them 429.
    throttle_classes: list = []

    @extend_schema(responses={200: dict, 503: dict})
    def get(self, request: Request) -> Response:
        detailed = may_read_operations(request, request.user)
        try:
            if detailed:
                return self._detailed()
            alive = live_worker_exists(stalled_after_seconds=settings.WORKER_STALLED_SECONDS)
        except DatabaseError as exc:
            logger.warning("health: database unreachable: %s", exc)
            reason = "database unreachable"
            if detailed:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                reason = f"{reason}: {first_line}"
            return Response(
                {"status": "unhealthy", "reasons": [reason], "database": "down"},
                status=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
        reasons = [] if alive else [self._no_worker()]
        return Response(
            {"status": "unhealthy" if reasons else "healthy", "reasons": reasons, "database": "up"},
            status=status.HTTP_503_SERVICE_UNAVAILABLE if reasons else status.HTTP_200_OK,
        )

    @staticmethod
    def _no_worker() -> str:
        return f"no live worker (no heartbeat in the last {settings.WORKER_STALLED_SECONDS:g} s)"

    def _detailed(self) -> Response:
        jobs = job_counts_by_queue()
        workers = live_workers(stalled_after_seconds=settings.WORKER_STALLED_SECONDS)
        spent, budget = llm_spend_this_month(), llm_budget_usd()
        mail = notification_health()
        breaker = breaker_state(name=EMAIL_BREAKER)
        reasons = [] if workers else [self._no_worker()]
        warnings = []
        if breaker["state"] != "closed":
            warnings.append(f"mail server circuit breaker is {breaker['state']}")
        if mail["failure_rate_15m"] > settings.NOTIFICATIONS_WARN_FAILURE_RATE:
            warnings.append(f"notification failure rate is {mail['failure_rate_15m']:.0%} over 15 minutes")
        if mail["backlog"] > settings.NOTIFICATIONS_WARN_BACKLOG:
            warnings.append(f"{mail['backlog']} notifications are due and waiting")
        body = {
            "status": "unhealthy" if reasons else "healthy",
            "reasons": reasons,
            "warnings": warnings,
            "database": "up",
            "jobs": jobs,
            "workers": {"live": len(workers), "ids": [w["id"] for w in workers]},
            "llm": {
                "configured": bool(settings.ANTHROPIC_API_KEY),
                "model": settings.ANTHROPIC_MODEL,
                "month_spend_usd": float(spent),
                "monthly_budget_usd": float(budget),
                "budget_exhausted": spent >= budget,
            },
            "notifications": {**mail, "circuit_breaker": breaker},
        }
        return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE if reasons else status.HTTP_200_OK)
