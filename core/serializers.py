"""The serializer base every app's model serializer derives from, and the mixin of answers that share their fields."""

from __future__ import annotations

import copy

from django.core.exceptions import ImproperlyConfigured
from rest_framework import serializers


class ModelSerializer(serializers.ModelSerializer):
    """DRF's ModelSerializer, with its fields built from the model once per class.

    DRF builds a model serializer's fields on every instance: it reads the model's fields and
    maps each one to a serializer field with its arguments: about 20 µs of CPU a field, a third
    of a note's answer (16 fields) in an interleaved timing. What it builds depends only on the
    class (its Meta, its declared fields and the model), so it is built once and each instance
    gets a deep copy, as DRF gives each instance copies of a serializer's declared fields."""

    def get_fields(self):
        cls = type(self)
        built = cls.__dict__.get("_fields_built_once")
        if built is None:
            built = super().get_fields()
            cls._fields_built_once = built  # two threads racing build the same fields
        return copy.deepcopy(built)


# Fields that render a value without reading the serializer's context, instance or parent.
_SHAREABLE_FIELDS = (
    serializers.BooleanField,
    serializers.CharField,  # and its EmailField, URLField...
    serializers.ChoiceField,
    serializers.DateField,
    serializers.DateTimeField,
    serializers.DecimalField,
    serializers.DictField,
    serializers.DurationField,
    serializers.FloatField,
    serializers.IntegerField,
    serializers.JSONField,
    serializers.ListField,
    serializers.ReadOnlyField,
    serializers.TimeField,
    serializers.UUIDField,
)


def _shareable(field: serializers.Field, *, child: bool = False) -> bool:
    """A read-only field (or a list's or dict's child) of a value type that renders as DRF does."""
    drf_rendering = type(field).to_representation.__module__ == serializers.Field.__module__
    if not (field.read_only or child) or not drf_rendering or not isinstance(field, _SHAREABLE_FIELDS):
        return False
    inner = getattr(field, "child", None)
    return inner is None or _shareable(inner, child=True)


class SharedFields:
    """For a serializer that only renders (an API's answer): its fields bound once per class
    and shared by every instance, instead of deep-copied for each one.

    Even built once, a note's 16 fields cost 443 µs of CPU to copy and bind for each answer,
    52 µs to share (an interleaved timing): a sixth of a small request. Sharing is safe for
    read-only fields of DRF's value types, which render from the value alone, never from the
    serializer's context, instance or parent (they are bound to a blank instance of the class);
    the first use raises ImproperlyConfigured on any other field (nested serializers, method
    and related fields, a field with a rendering of its own), and a test renders each such
    serializer of ours. Mix it in before the serializer class."""

    @property
    def fields(self):
        cls = type(self)
        shared = cls.__dict__.get("_fields_shared")
        if shared is None:
            blank = cls()
            shared = super(SharedFields, blank).fields
            refused = [name for name, field in shared.items() if not _shareable(field)]
            if refused:
                raise ImproperlyConfigured(f"{cls.__name__} cannot share fields {refused}: use it without SharedFields")
            cls._fields_shared = shared  # two threads racing build the same fields
        return shared
