"""Tier-1 metadata: cheap, synchronous, no network. Computed on every capture and edit."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from notes.models import NoteType

_HASHTAG = re.compile(r"(?<![\w#&/])#([A-Za-z][\w-]{0,63})")
_LINK = re.compile(r"https?://[^\s<>\"'()\[\]]+", re.IGNORECASE)
# A marker at the start of any line, after blanks. `[^\S\n]` is whitespace except the newline:
# `^\s*` under MULTILINE ran from every line start over all the blank lines after it, quadratic
# in the note's size (100 KB of newlines took minutes), and finds the same lines, because a
# marker preceded by blank lines is also at the start of the last of them.
_LINE_START = r"^[^\S\n]*"
_TASK = re.compile(_LINE_START + r"(?:[-*]\s*\[[ xX]?\]|todo\b|to do\b|task:)", re.IGNORECASE | re.MULTILINE)
_MEETING = re.compile(r"\b(?:meeting|agenda|attendees|1:1|standup|stand-up)\b", re.IGNORECASE)
_IDEA = re.compile(r"^\s*(?:idea\b|what if\b)", re.IGNORECASE)  # match() at 0 only: one scan
_QUOTE_OR_REF = re.compile(_LINE_START + r"(?:>|source:|ref:|via\b)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Tier1:
    word_count: int
    tags: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    note_type: str = NoteType.NOTE


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def guess_type(content: str, *, links: list[str], word_count: int) -> str:
    first_line = content.strip().splitlines()[0] if content.strip() else ""
    if _TASK.search(content):
        return NoteType.TASK
    if links and word_count <= len(links) + 8:
        return NoteType.LINK
    if _IDEA.match(content):
        return NoteType.IDEA
    if first_line.rstrip().endswith("?"):
        return NoteType.QUESTION
    if _MEETING.search(first_line):
        return NoteType.MEETING
    if _QUOTE_OR_REF.search(content):
        return NoteType.REFERENCE
    return NoteType.NOTE


def analyse(content: str) -> Tier1:
    links = _unique([link.rstrip(".,;:!?") for link in _LINK.findall(content)])
    # Links may carry "#fragments"; take hashtags from the text with the links removed.
    text = _LINK.sub(" ", content)
    tags = _unique([tag.lower() for tag in _HASHTAG.findall(text)])
    word_count = len(content.split())
    return Tier1(
        word_count=word_count,
        tags=tags,
        links=links,
        note_type=guess_type(content, links=links, word_count=word_count),
    )
