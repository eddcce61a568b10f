"""Request body parsers that answer hostile JSON with a 400, never a 500."""

from __future__ import annotations

import json
from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

NESTED_TOO_DEEPLY = "JSON parse error - nested too deeply."


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, plus the two inputs it lets through as server errors.

    - Nesting deeper than Python's recursion limit (`[[[[...` in a 200 kB body) makes the
      decoder raise RecursionError, which is not a ValueError.
    - A `\\ud800` escape decodes to a lone surrogate. It is valid JSON but not Unicode text:
      PostgreSQL's UTF-8 encoding refuses it when the value is saved.
    Bytes that are not UTF-8 already give a ParseError (UnicodeDecodeError is a ValueError).
    """

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
            # Valid surrogate pairs were joined by the decoder; a lone one fails to encode.
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except RecursionError as exc:
            raise ParseError(NESTED_TOO_DEEPLY) from exc
        except UnicodeEncodeError as exc:
            raise ParseError("JSON parse error - a \\u escape is an unpaired surrogate, not a character.") from exc
        return data
