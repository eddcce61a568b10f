"""The jobs API: a user's background jobs of every kind (staff see all), their timeline and
progress, cancel and retry, queue pause/resume, metrics, and a live stream of one job."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from procrastinate.contrib.django.models import ProcrastinateJob
from rest_framework import exceptions, mixins, renderers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.idempotency import idempotent
from jobs.console import selectors, services
from jobs.console.filters import JobFilter
from jobs.console.serializers import (
    BatchDetailSerializer,
    BatchRetrySerializer,
    BatchSerializer,
    JobDetailSerializer,
    JobSerializer,
    MetricsQuerySerializer,
    QueueSerializer,
    RetryRefusedSerializer,
    WebhookSecretSerializer,
)
from jobs.console.stream import (
    LIMIT_RETRY_AFTER_SECONDS,
    batch_event_stream,
    batch_stream_open,
    job_event_stream,
    job_stream_open,
    sse_event,
)
from jobs.console.stream_hub import StreamLimitReached, StreamUnavailable, Subscription
from jobs.models import JobBatch


def _check_may_act(request: Request, job: ProcrastinateJob, permission: str) -> None:
    """The owner may act on their job; anyone else must be staff with `permission`.

    A non-staff user never gets here for another user's job: it is not in their queryset (404)."""
    if job.owner_id is not None and job.owner_id == request.user.pk:
        return
    if not (request.user.is_staff and request.user.has_perm(permission)):
        raise exceptions.PermissionDenied(f"Acting on another user's job needs the {permission} permission.")


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Your background jobs (staff: everyone's). Another user's job is a 404."""

    queryset = ProcrastinateJob.objects.none()  # for the schema; requests use get_queryset()
    serializer_class = JobSerializer
    filterset_class = JobFilter
    ordering_fields = ["id", "scheduled_at", "priority", "attempts"]
    ordering = ["-id"]
    lookup_value_regex = r"\d+"

    def get_queryset(self):
        return selectors.job_queryset(user=self.request.user)

    @extend_schema(responses={200: JobDetailSerializer})
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(JobDetailSerializer(selectors.job_detail(job=self.get_object())).data)

    @extend_schema(
        request=None,
        responses={
            204: None,
            403: OpenApiResponse(description="Another user's job, without jobs.cancel_job"),
            409: OpenApiResponse(description="Already started"),
        },
    )
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        """Cancel a job that has not started yet."""
        job = self.get_object()
        _check_may_act(request, job, "jobs.cancel_job")
        services.job_cancel(job_id=job.id)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        request=None,
        responses={
            202: JobSerializer,
            403: OpenApiResponse(description="Another user's job, without jobs.retry_job"),
            409: OpenApiResponse(
                response=RetryRefusedSerializer,
                description="Not failed or aborted, or a job with the same queueing lock is already waiting"
                " (it does the same work: `waiting_job_id`, and `detail` says so)",
            ),
        },
    )
    @idempotent
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """Put a failed or aborted job back in its queue with fresh attempts. Refused (409) while
        a job with the same queueing lock waits: that job does the same work."""
        job = self.get_object()
        _check_may_act(request, job, "jobs.retry_job")
        services.job_retry(job_id=job.id)
        return Response(JobSerializer(self.get_object()).data, status=status.HTTP_202_ACCEPTED)


class BatchViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Your batches (staff: everyone's): progress, counts, members and callbacks. Another user's
    batch is a 404."""

    queryset = JobBatch.objects.none()  # for the schema; requests use get_queryset()
    serializer_class = BatchSerializer
    lookup_value_regex = r"\d+"

    def get_queryset(self):
        return selectors.batch_queryset(user=self.request.user)

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        data = BatchSerializer([selectors.batch_summary(batch=b) for b in page], many=True).data
        return self.get_paginated_response(data)

    @extend_schema(responses={200: BatchDetailSerializer})
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(BatchDetailSerializer(selectors.batch_detail(batch=self.get_object())).data)

    def _check_may_act(self, batch: JobBatch, permission: str) -> None:
        if batch.owner_id is not None and batch.owner_id == self.request.user.pk:
            return
        if not (self.request.user.is_staff and self.request.user.has_perm(permission)):
            raise exceptions.PermissionDenied(f"Acting on another user's batch needs the {permission} permission.")

    @extend_schema(
        request=None,
        responses={200: BatchDetailSerializer, 403: OpenApiResponse(description="Without jobs.cancel_job")},
    )
    @idempotent
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """Cancel the members that have not started (running ones finish)."""
        batch = self.get_object()
        self._check_may_act(batch, "jobs.cancel_job")
        services.job_batch_cancel(batch_id=batch.id)
        return Response(BatchDetailSerializer(selectors.batch_detail(batch=self.get_object())).data)

    @extend_schema(
        request=None,
        responses={202: BatchRetrySerializer, 403: OpenApiResponse(description="Without jobs.retry_job")},
    )
    @idempotent
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """Retry the failed (and aborted) members; a completed batch completes again after them."""
        batch = self.get_object()
        self._check_may_act(batch, "jobs.retry_job")
        outcome = services.job_batch_retry_failed(batch_id=batch.id)
        return Response(BatchRetrySerializer(outcome).data, status=status.HTTP_202_ACCEPTED)


def _require_staff(request: Request, permission: str | None = None) -> None:
    if not request.user.is_staff or (permission and not request.user.has_perm(permission)):
        raise exceptions.PermissionDenied("Staff only." if permission is None else f"Needs {permission}.")


class QueueListApi(APIView):
    @extend_schema(responses={200: QueueSerializer(many=True), 403: OpenApiResponse(description="Not staff")})
    def get(self, request: Request) -> Response:
        _require_staff(request)
        return Response(QueueSerializer(selectors.queue_list(), many=True).data)


_QUEUE_ACTION_RESPONSES = {
    200: QueueSerializer,
    400: OpenApiResponse(description="Unknown queue"),
    403: OpenApiResponse(description="Not staff with jobs.pause_queue"),
}


class QueuePauseApi(APIView):
    @extend_schema(request=None, responses=_QUEUE_ACTION_RESPONSES)
    def post(self, request: Request, name: str) -> Response:
        """Workers stop taking this queue's jobs at their next fetch; running jobs finish."""
        _require_staff(request, "jobs.pause_queue")
        services.queue_pause(queue=name, by=request.user)
        return Response(QueueSerializer(selectors.queue_state(name=name)).data)


class QueueResumeApi(APIView):
    @extend_schema(request=None, responses=_QUEUE_ACTION_RESPONSES)
    def post(self, request: Request, name: str) -> Response:
        _require_staff(request, "jobs.pause_queue")
        services.queue_resume(queue=name)
        return Response(QueueSerializer(selectors.queue_state(name=name)).data)


class JobMetricsApi(APIView):
    @extend_schema(parameters=[MetricsQuerySerializer], responses={200: OpenApiTypes.OBJECT})
    def get(self, request: Request) -> Response:
        """Counts, throughput, per-task latency percentiles and the oldest waiting job: your
        jobs, or every job for staff."""
        query = MetricsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        owner_id = None if request.user.is_staff else request.user.pk
        return Response(selectors.job_metrics(hours=query.validated_data["hours"], owner_id=owner_id))


class WebhookSecretApi(APIView):
    @extend_schema(responses={200: WebhookSecretSerializer})
    def get(self, request: Request) -> Response:
        """Your secret for verifying completion webhooks (made on first read)."""
        return Response(WebhookSecretSerializer(services.webhook_secret_get(user_id=request.user.pk)).data)


class WebhookSecretRotateApi(APIView):
    @extend_schema(request=None, responses={200: WebhookSecretSerializer})
    def post(self, request: Request) -> Response:
        """Replace your webhook secret. Every delivery sent from now on, including retries of
        deliveries queued before, is signed with the new one; the old one stops at once."""
        return Response(WebhookSecretSerializer(services.webhook_secret_rotate(user_id=request.user.pk)).data)


class EventStreamRenderer(renderers.BaseRenderer):
    """Lets a client that accepts only text/event-stream through content negotiation; errors
    (401, 404) reach it as one `error` event."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        return sse_event("error", data if isinstance(data, dict) else {"detail": data}).encode()


class _StreamRefused(exceptions.APIException):
    """A 429 (a stream cap) or 503 (no database), with Retry-After (DRF sets it from `wait`)."""

    def __init__(self, detail: str, *, status_code: int, wait: float) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.wait = max(1, math.ceil(wait))


class _StreamApi(APIView):
    """An async view: DRF's checks (authentication, permissions, throttles) and the lookup run in
    a thread; the stream itself runs on the event loop (jobs/console/stream.py)."""

    renderer_classes = [renderers.JSONRenderer, EventStreamRenderer]

    def _lookup(self, request: Request, pk: int) -> int | None:
        """The id to stream, if `request.user` may see it."""
        raise NotImplementedError

    async def _open(self, pk: int, user_id: int | None) -> Subscription:
        raise NotImplementedError

    def _events(self, subscription: Subscription) -> AsyncIterator[str]:
        raise NotImplementedError

    async def _stream(self, request: Request) -> StreamingHttpResponse:
        try:
            subscription = await self._open(self._pk, request.user.pk)
        except StreamLimitReached as exc:
            raise _StreamRefused(exc.detail, status_code=429, wait=LIMIT_RETRY_AFTER_SECONDS) from None
        except StreamUnavailable as exc:
            raise _StreamRefused(
                "Job streams cannot reach the database; retry later.", status_code=503, wait=exc.retry_after
            ) from None
        response = StreamingHttpResponse(self._events(subscription), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # no proxy buffering (nginx)
        return response

    def _check(self, request: Request, pk: int) -> None:
        """DRF's initial() (it resolves request.user: the token lookup is a query) and the lookup."""
        try:
            self.initial(request)
            found = self._lookup(request, pk)
            if found is None:
                raise exceptions.NotFound()
            self._pk = found
        finally:
            # The stream keeps no database connection: give this thread's back (to the pool under
            # ASGI) now, not when the stream ends. Not inside a test's transaction.
            if not connection.in_atomic_block:
                connection.close()

    async def dispatch(self, request, *args, **kwargs):
        """APIView.dispatch with the sync steps in a thread and an async handler."""
        self.args, self.kwargs = args, kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            if request.method in ("GET", "HEAD"):
                await sync_to_async(self._check)(request, kwargs["pk"])
                response = await self.get(request, *args, **kwargs)
            else:  # OPTIONS, or a method not allowed
                await sync_to_async(self.initial)(request)
                handler = getattr(self, request.method.lower(), self.http_method_not_allowed)
                response = await sync_to_async(handler)(request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response


def _stream_refusals(thing: str) -> dict[int, OpenApiResponse]:
    return {
        404: OpenApiResponse(description=f"No such {thing} of yours"),
        429: OpenApiResponse(description="Too many open streams (per user or per server); see Retry-After"),
        503: OpenApiResponse(description="The streams cannot reach the database; see Retry-After"),
    }


_BATCH_STREAM_EXAMPLE = (
    "retry: 3000\n\n"
    "event: progress\n"
    'data: {"state": "sealed", "total": 3, "done": 2, "succeeded": 2, "failed": 0, "cancelled": 0, "percent": 66.7}\n\n'
    ": keep-alive\n\n"
    "event: progress\n"
    'data: {"state": "done", "total": 3, "done": 3, "succeeded": 2, "failed": 1, "cancelled": 0, "percent": 100.0}\n\n'
    "event: end\n"
    'data: {"state": "done", "total": 3, "done": 3, "succeeded": 2, "failed": 1, "cancelled": 0, "percent": 100.0,'
    ' "callback_job_ids": [812]}\n\n'
)


class JobStreamApi(_StreamApi):
    @extend_schema(responses={(200, "text/event-stream"): OpenApiTypes.STR, **_stream_refusals("job")})
    async def get(self, request: Request, pk: int) -> StreamingHttpResponse:
        """Server-Sent Events of the job's status and progress, ending with `end`."""
        return await self._stream(request)

    def _lookup(self, request: Request, pk: int) -> int | None:
        return selectors.job_queryset(user=request.user).filter(pk=pk).values_list("id", flat=True).first()

    async def _open(self, pk: int, user_id: int | None) -> Subscription:
        return await job_stream_open(job_id=pk, user_id=user_id)

    def _events(self, subscription: Subscription) -> AsyncIterator[str]:
        return job_event_stream(subscription)


class BatchStreamApi(_StreamApi):
    @extend_schema(
        operation_id="jobs_batches_stream",
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                response=OpenApiTypes.STR,
                description="`progress` events (data: `state`, `total`, `done`, `succeeded`, `failed`,"
                " `cancelled`, `percent`) as members end, then `end` (the same, with `callback_job_ids`)"
                " once the batch is done, and the stream closes.",
                examples=[OpenApiExample("A batch that ends", value=_BATCH_STREAM_EXAMPLE, response_only=True)],
            ),
            **_stream_refusals("batch"),
        },
    )
    async def get(self, request: Request, pk: int) -> StreamingHttpResponse:
        """Server-Sent Events of the batch's progress, ending with `end` when it is done."""
        return await self._stream(request)

    def _lookup(self, request: Request, pk: int) -> int | None:
        return selectors.batch_queryset(user=request.user).filter(pk=pk).values_list("id", flat=True).first()

    async def _open(self, pk: int, user_id: int | None) -> Subscription:
        return await batch_stream_open(batch_id=pk, user_id=user_id)

    def _events(self, subscription: Subscription) -> AsyncIterator[str]:
        return batch_event_stream(subscription)
