from __future__ import annotations

from django.conf import settings
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.idempotency import idempotent
from notes import selectors, services
from notes.filters import NoteFilter
from notes.models import Note
from notes.serializers import (
    NoteImportInputSerializer,
    NoteImportOutputSerializer,
    NoteInputSerializer,
    NoteOutputSerializer,
    upload_too_large,
)


class NoteViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Notes of the signed-in user; another user's note is a 404."""

    serializer_class = NoteOutputSerializer
    filterset_class = NoteFilter
    search_fields = ["title", "content"]
    ordering_fields = ["created_at", "updated_at", "word_count"]
    queryset = Note.objects.none()  # for the schema; requests use get_queryset()

    def get_queryset(self):
        return selectors.note_list(owner=self.request.user)

    @extend_schema(request=NoteInputSerializer, responses={201: NoteOutputSerializer})
    @idempotent
    def create(self, request: Request) -> Response:
        data = NoteInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        note = services.note_create(owner=request.user, **data.validated_data)
        return Response(NoteOutputSerializer(note).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=NoteInputSerializer, responses={200: NoteOutputSerializer})
    def update(self, request: Request, pk: str | None = None) -> Response:
        return self._update(request, partial=False)

    @extend_schema(request=NoteInputSerializer, responses={200: NoteOutputSerializer})
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        return self._update(request, partial=True)

    def _update(self, request: Request, *, partial: bool) -> Response:
        note = self.get_object()
        data = NoteInputSerializer(data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        note = services.note_update(note=note, **data.validated_data)
        return Response(NoteOutputSerializer(note).data)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        services.note_delete(note=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


# Room for the multipart framing and the small form fields around the file.
_MULTIPART_OVERHEAD_BYTES = 64 * 1024

_ImportQueued = inline_serializer(
    "NoteImportQueued",
    {"import_id": serializers.IntegerField(), "job_id": serializers.IntegerField(), "status": serializers.CharField()},
)


class NoteImportApi(APIView):
    """POST a CSV or JSON-lines file of notes; it is imported in the background (202)."""

    parser_classes = [MultiPartParser]

    def initial(self, request: Request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)
        # Refuse an oversized body before Django spools it to disk (or anything parses it, such
        # as the Idempotency-Key check), once the caller is known to be allowed in.
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > settings.IMPORTS_MAX_UPLOAD_BYTES + _MULTIPART_OVERHEAD_BYTES:
            raise upload_too_large(None)

    @extend_schema(request={"multipart/form-data": NoteImportInputSerializer}, responses={202: _ImportQueued})
    @idempotent
    def post(self, request: Request) -> Response:
        data = NoteImportInputSerializer(data=request.data, context={"owner": request.user})
        data.is_valid(raise_exception=True)
        upload = data.validated_data["file"]
        note_import = services.note_import_create(
            owner=request.user,
            file=upload,
            filename=upload.name or "",
            format=data.validated_data["format"],
            callback_url=data.validated_data.get("callback_url"),
            notify_email=data.validated_data["notify_email"],
        )
        return Response(
            {"import_id": note_import.id, "job_id": note_import.job_id, "status": note_import.status},
            status=status.HTTP_202_ACCEPTED,
        )


class NoteImportDetailApi(APIView):
    """An import's status, counters and first errors. Another user's import is a 404."""

    @extend_schema(responses={200: NoteImportOutputSerializer})
    def get(self, request: Request, import_id: int) -> Response:
        note_import = get_object_or_404(selectors.note_import_list(owner=request.user), id=import_id)
        return Response(NoteImportOutputSerializer(note_import).data)
