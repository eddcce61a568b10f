from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from notes import selectors, services
from notes.filters import NoteFilter
from notes.models import Note
from notes.serializers import NoteInputSerializer, NoteOutputSerializer


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
