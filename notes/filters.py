from __future__ import annotations

import django_filters
from django.db.models import Q, QuerySet

from notes.models import Note, NoteType


class NoteFilter(django_filters.FilterSet):
    type = django_filters.ChoiceFilter(field_name="note_type", choices=NoteType.choices)
    tag = django_filters.CharFilter(method="filter_tag", max_length=64)
    enrichment_status = django_filters.CharFilter()

    class Meta:
        model = Note
        fields = ["type", "tag", "enrichment_status"]

    def filter_tag(self, queryset: QuerySet[Note], name: str, value: str) -> QuerySet[Note]:
        tag = value.lstrip("#").lower()
        return queryset.filter(Q(tags__contains=[tag]) | Q(ai_tags__contains=[tag]))
