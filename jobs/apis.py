"""The jobs API: a user's background jobs of every kind (staff see all), their timeline and
progress, cancel and retry, queue pause/resume, metrics, and a live stream of one job."""

from __future__ import annotations

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from procrastinate.contrib.django.models import ProcrastinateJob
from rest_framework import exceptions, mixins, renderers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.idempotency import idempotent
from jobs import selectors, services
from jobs.filters import JobFilter
from jobs.serializers import (
    JobDetailSerializer,
    JobSerializer,
    MetricsQuerySerializer,
    QueueSerializer,
    WebhookSecretSerializer,
)
from jobs.stream import job_event_stream, sse_event


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
            409: OpenApiResponse(description="Not failed"),
        },
    )
    @idempotent
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """Put a failed or aborted job back in its queue with fresh attempts."""
        job = self.get_object()
        _check_may_act(request, job, "jobs.retry_job")
        services.job_retry(job_id=job.id)
        return Response(JobSerializer(self.get_object()).data, status=status.HTTP_202_ACCEPTED)


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


class JobStreamApi(APIView):
    renderer_classes = [renderers.JSONRenderer, EventStreamRenderer]

    @extend_schema(responses={(200, "text/event-stream"): OpenApiTypes.STR})
    def get(self, request: Request, pk: int) -> StreamingHttpResponse:
        """Server-Sent Events of the job's status and progress, ending with `end`."""
        job = selectors.job_queryset(user=request.user).filter(pk=pk).first()
        if job is None:
            raise exceptions.NotFound()
        response = StreamingHttpResponse(job_event_stream(job_id=job.id), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # no proxy buffering (nginx)
        return response
