from __future__ import annotations

import zoneinfo
from typing import Any

from rest_framework import serializers


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers, booleans and objects instead of coercing them."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class TimeZoneField(StrictCharField):
    """An IANA time zone name, e.g. "Europe/Paris"."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 64)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        # Checked before the lookup, which opens a file named after the value (max_length is
        # only checked after this method).
        if len(value) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise serializers.ValidationError(f"Unknown time zone {value!r}; use an IANA name.") from exc
        return value
