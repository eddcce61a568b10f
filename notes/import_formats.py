"""Streaming parsers for bulk note import: CSV and JSON lines, one record at a time.

Nothing here holds a whole file or all of its rows. The bytes come from any binary stream
(the upload being checked, or `StoredFile`, which reads the copy in PostgreSQL a slice at a
time); they are decoded incrementally and split into lines of bounded length, so one
pathological line costs at most `line_limit()` characters of memory.

    with open_text(stream) as text:
        for record in read_records(text, "csv"):   # Record(line, values) or Record(line, error)
            row = row_validate(record)            # ImportRow, or the reason the row is skipped

The values are kept as the text they are: nothing is trimmed, evaluated or unescaped beyond
what CSV quoting or JSON itself requires (a title "=1+2" is stored as "=1+2").
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

from django.conf import settings

from notes.models import ImportFormat, Note

COLUMNS = ("title", "content", "tags", "external_id")
TITLE_MAX_CHARS = Note._meta.get_field("title").max_length
TAG_MAX_CHARS = 64  # Note.tags holds varchar(64)
TAGS_MAX = 64
EXTERNAL_ID_MAX_CHARS = 200

_INVALID_TEXT = re.compile("[\ud800-\udfff]")  # invalid UTF-8 bytes decode to lone surrogates
_TAG_SEPARATORS = re.compile(r"[,\s]+")
_LINE_ENDS = ("\n", "\r")


class ImportFileError(Exception):
    """The file as a whole cannot be imported (no header, no content column, ...).

    `permanent`: the job layer does not retry it (jobs.tasking.retry)."""

    permanent = True


@dataclass(frozen=True, slots=True)
class Record:
    """One row of the file: its values by column name, or why it could not be parsed."""

    line: int
    values: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ImportRow:
    """A valid row, ready to become a note."""

    line: int
    title: str
    content: str
    tags: list[str]
    import_key: str


def format_infer(*, filename: str, content_type: str | None) -> str | None:
    """The format a file's name or content type says, or None."""
    name = filename.lower()
    if name.endswith(".csv"):
        return ImportFormat.CSV
    if name.endswith((".jsonl", ".ndjson", ".jsonlines")):
        return ImportFormat.JSONL
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in ("text/csv", "application/csv"):
        return ImportFormat.CSV
    if media_type in ("application/jsonl", "application/x-jsonlines", "application/x-ndjson", "application/ndjson"):
        return ImportFormat.JSONL
    return None


def line_limit() -> int:
    """The longest physical line a valid row can need: its content (the largest field)
    with every character escaped (CSV doubles quotes; JSON's \\uXXXX is 6 characters for a
    character that is 1 to 3 bytes of UTF-8), plus room for the other fields."""
    return 2 * settings.NOTE_MAX_CONTENT_BYTES + 64 * 1024


class StoredFile(io.RawIOBase):
    """A read-only binary stream over a file kept elsewhere, fetched `chunk_bytes` at a time.

    `fetch(offset, length)` returns up to `length` bytes from `offset` (0-based).
    """

    def __init__(self, *, size: int, fetch: Callable[[int, int], bytes], chunk_bytes: int = 1 << 20) -> None:
        super().__init__()
        self.size = size
        self._fetch = fetch
        self._chunk_bytes = chunk_bytes
        self._chunk = b""
        self._chunk_start = 0  # file offset of self._chunk[0]
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._position >= self.size:
            return 0
        offset = self._position - self._chunk_start
        if offset >= len(self._chunk):
            self._chunk = self._fetch(self._position, min(self._chunk_bytes, self.size - self._position))
            self._chunk_start, offset = self._position, 0
            if not self._chunk:
                return 0
        count = min(len(buffer), len(self._chunk) - offset)
        buffer[:count] = self._chunk[offset : offset + count]
        self._position += count
        return count


@contextmanager
def open_text(stream: BinaryIO | io.RawIOBase) -> Iterator[TextIO]:
    """Decode a binary stream incrementally as UTF-8 (a leading BOM is dropped).

    Invalid bytes do not stop the file: they become lone surrogates, and the rows holding them
    are skipped by row_validate. Line endings are left as they are (csv needs them).
    The stream is left open.
    """
    buffered = io.BufferedReader(stream) if isinstance(stream, io.RawIOBase) else stream
    text = io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="surrogateescape", newline="")  # type: ignore[arg-type]
    try:
        yield text
    finally:
        text.detach()  # closing the wrapper would close the caller's stream


class _Lines:
    """The physical lines of a text stream, each at most `limit` characters.

    A longer line is cut at `limit` (the rest is read and dropped) and remembered in
    `overlong`, so the record holding it is reported instead of imported.
    """

    def __init__(self, text: TextIO, limit: int) -> None:
        self.text = text
        self.limit = limit
        self.count = 0  # complete lines read so far
        self.overlong = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.limit)
        if not line:
            raise StopIteration
        if len(line) >= self.limit and not line.endswith(_LINE_ENDS):
            self.overlong = True
            while (rest := self.text.readline(self.limit)) and not rest.endswith(_LINE_ENDS):
                pass
            line += "\n"
        if line.endswith(_LINE_ENDS):
            self.count += 1
        return line


def read_records(text: TextIO, fmt: str) -> Iterator[Record]:
    """The rows of the file, in order, with the line each starts on (blank lines are not rows).

    Raises ImportFileError when the file cannot be read at all (CSV: no usable header row).
    """
    if fmt == ImportFormat.CSV:
        return _csv_records(text)
    if fmt == ImportFormat.JSONL:
        return _jsonl_records(text)
    raise ImportFileError(f"Unknown format {fmt!r}.")


def _csv_records(text: TextIO) -> Iterator[Record]:
    # A field longer than any valid content is an error, not a memory sink (an unterminated
    # quote would otherwise swallow the rest of the file). The limit is process-wide: raise only.
    csv.field_size_limit(max(csv.field_size_limit(), settings.NOTE_MAX_CONTENT_BYTES + 1))
    lines = _Lines(text, line_limit())
    reader = csv.reader(lines, strict=False)
    header, width = _csv_header(reader, lines)
    while True:
        start = lines.count + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            lines.overlong = False
            yield Record(start, error=f"malformed CSV: {exc}")
            continue
        if lines.overlong:
            lines.overlong = False
            yield Record(start, error=f"a line is longer than {lines.limit} characters")
            continue
        if not fields:  # a blank line
            continue
        if len(fields) > width:
            yield Record(start, error=f"{len(fields)} fields, but the header has {width}")
            continue
        # Missing trailing fields are empty, as spreadsheets write them.
        yield Record(start, values={name: fields[i] if i < len(fields) else "" for name, i in header.items()})


def _csv_header(reader: Iterator[list[str]], lines: _Lines) -> tuple[dict[str, int], int]:
    """Column name -> position, from the first non-blank row, and the number of columns.
    Unknown columns are ignored."""
    try:
        fields: list[str] = []
        while not fields:
            fields = next(reader)
    except StopIteration:
        raise ImportFileError("The file has no header row.") from None
    except csv.Error as exc:
        raise ImportFileError(f"The header row is not valid CSV: {exc}.") from None
    if lines.overlong:
        raise ImportFileError("The header row is too long.")
    names = [field.strip().lower() for field in fields]
    if any(_INVALID_TEXT.search(name) for name in names):
        raise ImportFileError("The header row is not valid UTF-8.")
    header: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in COLUMNS:
            if name in header:
                raise ImportFileError(f"The header names the column {name!r} twice.")
            header[name] = position
    if "content" not in header:
        raise ImportFileError(
            f"The header row has no 'content' column (columns: {', '.join(COLUMNS)}; header row required)."
        )
    return header, len(names)


def _jsonl_records(text: TextIO) -> Iterator[Record]:
    lines = _Lines(text, line_limit())
    for line in lines:
        number = lines.count if line.endswith(_LINE_ENDS) else lines.count + 1
        if lines.overlong:
            lines.overlong = False
            yield Record(number, error=f"the line is longer than {lines.limit} characters")
            continue
        if not line.strip():
            continue
        if _INVALID_TEXT.search(line):
            yield Record(number, error="the line is not valid UTF-8")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record(number, error=f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:
            yield Record(number, error="invalid JSON: nested too deeply")
            continue
        if not isinstance(value, dict):
            yield Record(number, error=f"expected a JSON object, got {_json_type(value)}")
            continue
        yield Record(number, values=value)


def file_check(stream: BinaryIO, fmt: str) -> None:
    """Refuse a file that cannot be imported at all: raises ImportFileError.

    Reads only as far as the header and the first row. Rows with errors are not refused here;
    the import skips them and reports each one.
    """
    with open_text(stream) as text:
        first = next(read_records(text, fmt), None)
    if first is None:
        raise ImportFileError(
            "The file has no rows." if fmt == ImportFormat.JSONL else "The file has a header but no rows."
        )


def row_validate(record: Record) -> ImportRow | str:
    """The row as a note to create, or the reason it is skipped."""
    if record.error is not None:
        return record.error
    values = record.values or {}
    content = values.get("content")
    if content is None:
        return "content is missing"
    if not isinstance(content, str):
        return f"content must be a string, not {_json_type(content)}"
    if problem := _text_problem("content", content):
        return problem
    if not content.strip():
        return "content is blank"
    size = len(content.encode("utf-8"))
    if size > settings.NOTE_MAX_CONTENT_BYTES:
        return f"content is {size} bytes; the limit is {settings.NOTE_MAX_CONTENT_BYTES} bytes"

    title = values.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        return f"title must be a string, not {_json_type(title)}"
    if problem := _text_problem("title", title):
        return problem
    if len(title) > TITLE_MAX_CHARS:
        return f"title is longer than {TITLE_MAX_CHARS} characters"

    tags = _tags(values.get("tags"))
    if isinstance(tags, str):
        return tags

    external_id = values.get("external_id")
    if isinstance(external_id, int) and not isinstance(external_id, bool):
        external_id = str(external_id)
    if external_id is not None and not isinstance(external_id, str):
        return f"external_id must be a string or an integer, not {_json_type(external_id)}"
    external_id = (external_id or "").strip()
    if problem := _text_problem("external_id", external_id):
        return problem
    if len(external_id) > EXTERNAL_ID_MAX_CHARS:
        return f"external_id is longer than {EXTERNAL_ID_MAX_CHARS} characters"

    return ImportRow(
        line=record.line,
        title=title,
        content=content,
        tags=tags,
        import_key=external_id or import_key_of(title=title, content=content),
    )


def import_key_of(*, title: str, content: str) -> str:
    """The identity of a row without an external_id. NUL never occurs in a valid row, so it
    separates title and content unambiguously."""
    digest = hashlib.sha256(f"{title}\x00{content}".encode()).hexdigest()
    return f"sha256:{digest}"


def _tags(value: Any) -> list[str] | str:
    """Tags from "a, b c", "#a #b" or ["a", "#b"]: lower case, without '#', each once."""
    if value is None:
        return []
    if isinstance(value, str):
        raw = _TAG_SEPARATORS.split(value)
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        raw = [part for item in value for part in _TAG_SEPARATORS.split(item)]
    else:
        return "tags must be a string or a list of strings"
    tags: dict[str, None] = {}
    for item in raw:
        tag = item.lstrip("#").lower()
        if not tag:
            continue
        if problem := _text_problem("tags", tag):
            return problem
        if len(tag) > TAG_MAX_CHARS:
            return f"a tag is longer than {TAG_MAX_CHARS} characters"
        tags[tag] = None
    if len(tags) > TAGS_MAX:
        return f"more than {TAGS_MAX} tags"
    return list(tags)


def _text_problem(name: str, value: str) -> str | None:
    if _INVALID_TEXT.search(value):
        return f"{name} is not valid UTF-8"
    if "\x00" in value:
        return f"{name} contains a NUL character"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def count_records(text: TextIO, fmt: str) -> int:
    """How many rows the file has (valid or not), reading it once without keeping any."""
    return sum(1 for _ in read_records(text, fmt))
