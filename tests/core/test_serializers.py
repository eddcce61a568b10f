"""The model serializer base (core/serializers.py): fields built from the model once per class."""

from __future__ import annotations

import contextlib
import importlib

import pytest
from django.apps import apps
from rest_framework import serializers

from core.serializers import ModelSerializer
from notes.serializers import NoteOutputSerializer


def _model_serializers() -> list[type]:
    """The model serializers of our own apps (not installed packages)."""
    ours = {config.name for config in apps.get_app_configs() if "site-packages" not in config.path}
    for config in apps.get_app_configs():  # every app's serializers module, loaded
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(f"{config.name}.serializers")
    found, todo = [], [serializers.ModelSerializer]
    while todo:
        for subclass in todo.pop().__subclasses__():
            todo.append(subclass)
            found.append(subclass)
    return [cls for cls in found if cls.__module__.split(".")[0] in ours and cls is not ModelSerializer]


def test_a_model_serializer_builds_its_fields_once_per_class(monkeypatch):
    NoteOutputSerializer().fields  # noqa: B018 (built here, or by an earlier test)
    built = []
    upstream = serializers.ModelSerializer.build_field
    monkeypatch.setattr(
        serializers.ModelSerializer, "build_field", lambda self, *a, **k: built.append(a[0]) or upstream(self, *a, **k)
    )
    first, second = NoteOutputSerializer().fields, NoteOutputSerializer().fields
    assert built == []
    assert list(first) == list(NoteOutputSerializer.Meta.fields)
    # Each instance has fields of its own, bound to it, as DRF's own copies are.
    assert first["title"] is not second["title"]
    assert first["title"].parent is not second["title"].parent
    # The same fields DRF builds afresh.
    assert repr(serializers.ModelSerializer.get_fields(NoteOutputSerializer())) == repr(
        NoteOutputSerializer().get_fields()
    )


@pytest.mark.parametrize("serializer", _model_serializers(), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_model_serializer_of_ours_derives_from_the_base(serializer):
    assert issubclass(serializer, ModelSerializer)
