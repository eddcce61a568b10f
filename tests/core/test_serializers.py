"""The model serializer base (core/serializers.py): fields built from the model once per class."""

from __future__ import annotations

import contextlib
import importlib

import pytest
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from rest_framework import serializers

from core.serializers import ModelSerializer, SharedFields
from notes.serializers import NoteOutputSerializer


def _subclasses(base: type) -> list[type]:
    """Every subclass of `base` defined outside core.serializers and the tests, at any depth."""
    found, todo = [], [base]
    while todo:
        for subclass in todo.pop().__subclasses__():
            todo.append(subclass)
            found.append(subclass)
    return [cls for cls in found if cls.__module__.split(".")[0] != "tests" and cls.__module__ != "core.serializers"]


def _model_serializers() -> list[type]:
    """The model serializers of our own apps (not installed packages)."""
    ours = {config.name for config in apps.get_app_configs() if "site-packages" not in config.path}
    for config in apps.get_app_configs():  # every app's serializers module, loaded
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(f"{config.name}.serializers")
    return [cls for cls in _subclasses(serializers.ModelSerializer) if cls.__module__.split(".")[0] in ours]


class _NoteCopied(ModelSerializer):
    """A note's answer with its fields copied for each instance (not shared)."""

    class Meta(NoteOutputSerializer.Meta):
        pass


def test_a_model_serializer_builds_its_fields_once_per_class(monkeypatch):
    _NoteCopied().fields  # noqa: B018 (built here, or by an earlier test)
    built = []
    upstream = serializers.ModelSerializer.build_field
    monkeypatch.setattr(
        serializers.ModelSerializer, "build_field", lambda self, *a, **k: built.append(a[0]) or upstream(self, *a, **k)
    )
    first, second = _NoteCopied().fields, _NoteCopied().fields
    assert built == []
    assert list(first) == list(NoteOutputSerializer.Meta.fields)
    # Each instance has fields of its own, bound to it, as DRF's own copies are.
    assert first["title"] is not second["title"]
    assert first["title"].parent is not second["title"].parent
    # The same fields DRF builds afresh.
    assert repr(serializers.ModelSerializer.get_fields(_NoteCopied())) == repr(_NoteCopied().get_fields())


@pytest.mark.parametrize("serializer", _model_serializers(), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_model_serializer_of_ours_derives_from_the_base(serializer):
    assert issubclass(serializer, ModelSerializer)


@pytest.mark.django_db
def test_an_answer_shares_its_fields_and_renders_as_drf_does():
    from notes import services
    from tests.factories import make_user

    user = make_user("alice")
    notes = [services.note_create(owner=user, content=f"Note {n} about #queues https://example.com/{n}") for n in "ab"]
    assert NoteOutputSerializer(notes[0]).fields is NoteOutputSerializer(notes[1]).fields
    for note in notes:
        assert NoteOutputSerializer(note).data == _NoteCopied(note).data
    assert NoteOutputSerializer(notes, many=True).data == _NoteCopied(notes, many=True).data
    # Bound to a blank instance: no note, request or context is kept alive by the class.
    field = NoteOutputSerializer().fields["title"]
    assert field.parent.instance is None and field.context == {}


@pytest.mark.parametrize(
    "declared",
    [
        {"extra": serializers.SerializerMethodField()},
        {"nested": NoteOutputSerializer(read_only=True)},
        {"writable": serializers.CharField()},
        {
            "own": type("Own", (serializers.CharField,), {"to_representation": lambda self, value: value})(
                read_only=True
            )
        },
    ],
    ids=["method", "nested", "writable", "own rendering"],
)
def test_a_field_that_could_read_the_context_or_parent_is_refused(declared):
    answer = type("Answer", (SharedFields, serializers.Serializer), {**declared, "get_extra": lambda self, obj: 1})
    with pytest.raises(ImproperlyConfigured, match="cannot share fields"):
        answer().fields  # noqa: B018


@pytest.mark.parametrize("serializer", _subclasses(SharedFields), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_answer_of_ours_that_shares_its_fields_may(serializer):
    assert serializer().fields
