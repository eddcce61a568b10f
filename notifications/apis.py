from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.idempotency import IdempotentCreateMixin, idempotent
from notifications import selectors, services
from notifications.filters import NotificationJobFilter
from notifications.models import NotificationJob, Recipient
from notifications.serializers import (
    BulkQueuedSerializer,
    MetricsQuerySerializer,
    NotificationJobDetailSerializer,
    NotificationJobSerializer,
    QueuedSerializer,
    RecipientSerializer,
    SendBulkSerializer,
    SendEmailSerializer,
)


class RecipientViewSet(IdempotentCreateMixin, viewsets.ModelViewSet):
    serializer_class = RecipientSerializer
    queryset = Recipient.objects.none()
    filterset_fields = ["relationship"]
    search_fields = ["name", "email"]
    ordering_fields = ["name", "created_at"]

    def get_queryset(self):
        return selectors.recipient_list(owner=self.request.user)

    def perform_create(self, serializer: RecipientSerializer) -> None:
        serializer.instance = services.recipient_create(owner=self.request.user, **serializer.validated_data)

    def perform_update(self, serializer: RecipientSerializer) -> None:
        serializer.instance = services.recipient_update(recipient=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: Recipient) -> None:
        services.recipient_delete(recipient=instance)


class SendEmailApi(APIView):
    @extend_schema(request=SendEmailSerializer, responses={202: QueuedSerializer})
    @idempotent
    def post(self, request: Request) -> Response:
        data = SendEmailSerializer(data=request.data, context={"request": request})
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        fields.pop("delivery_method")
        notification = services.notification_send_email(
            owner=request.user,
            recipient=fields.pop("recipient_id"),
            callback_url=fields.pop("callback_url", None),
            **fields,
        )
        return Response(
            {
                "notification_id": notification.id,
                "job_id": notification.id,  # deprecated alias, see QueuedSerializer
                "status": "queued",
                "message": "The e-mail is queued for delivery.",
            },
            status=status.HTTP_202_ACCEPTED,
        )


class SendBulkApi(APIView):
    @extend_schema(request=SendBulkSerializer, responses={202: BulkQueuedSerializer})
    @idempotent
    def post(self, request: Request) -> Response:
        data = SendBulkSerializer(data=request.data, context={"request": request})
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        fields.pop("delivery_method")
        ids = services.notification_send_bulk(owner=request.user, recipients=fields.pop("recipient_ids"), **fields)
        return Response(
            {
                "notification_ids": ids,
                "job_ids": ids,  # deprecated alias, see BulkQueuedSerializer
                "status": "queued",
                "message": f"{len(ids)} e-mails are queued for delivery.",
            },
            status=status.HTTP_202_ACCEPTED,
        )


class NotificationJobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The caller's notification jobs. DELETE cancels one that has not started."""

    queryset = NotificationJob.objects.none()
    filterset_class = NotificationJobFilter
    ordering_fields = ["created_at", "scheduled_for", "processed_at", "status"]

    def get_queryset(self):
        if self.action == "retrieve":
            return selectors.notification_detail_queryset(owner=self.request.user)
        return selectors.notification_list(owner=self.request.user)

    def get_serializer_class(self):
        return NotificationJobDetailSerializer if self.action == "retrieve" else NotificationJobSerializer

    @extend_schema(
        request=None,
        responses={
            200: NotificationJobSerializer,
            409: OpenApiResponse(description="Already being delivered, or done"),
        },
    )
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        notification = services.notification_cancel(notification=self.get_object())
        return Response(NotificationJobSerializer(notification).data)

    @extend_schema(
        request=None, responses={202: NotificationJobSerializer, 409: OpenApiResponse(description="Not failed")}
    )
    @idempotent
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        notification = services.notification_retry(notification=self.get_object())
        return Response(NotificationJobSerializer(notification).data, status=status.HTTP_202_ACCEPTED)


class NotificationMetricsApi(APIView):
    @extend_schema(parameters=[MetricsQuerySerializer], responses={200: dict})
    def get(self, request: Request) -> Response:
        query = MetricsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(selectors.notification_metrics(owner=request.user, hours=query.validated_data["hours"]))
