"""The Claude prompt for Tier-2 enrichment and the strict reading of its answer."""

from __future__ import annotations

import json
from dataclasses import dataclass

from notes.models import Note, NoteType

# Enough context for a useful answer while bounding the cost of a 100 KB note.
MAX_PROMPT_CHARS = 12_000
MAX_TAGS = 8

SYSTEM_PROMPT = (
    "You enrich notes in a personal knowledge base. Answer with one JSON object and nothing "
    "else, with exactly these keys: "
    f'"type" (one of: {", ".join(NoteType.values)}), '
    '"tags" (up to 8 short lowercase topic tags, without "#"), '
    '"summary" (one sentence, at most 200 characters), '
    '"connections" (ids of related notes among the candidates listed, possibly empty).'
)


@dataclass(frozen=True)
class Enrichment:
    note_type: str
    tags: list[str]
    summary: str
    connections: list[int]


class UnparseableAnswer(ValueError):
    pass


def build_prompt(note: Note, candidates: list[Note]) -> str:
    lines = [f"Note #{note.id}"]
    if note.title:
        lines.append(f"Title: {note.title}")
    lines += ["Content:", note.content[:MAX_PROMPT_CHARS], "", "Candidate related notes:"]
    if not candidates:
        lines.append("(none)")
    for other in candidates:
        snippet = " ".join((other.title or other.content).split())[:160]
        lines.append(f"- id {other.id}: {snippet}")
    return "\n".join(lines)


def _json_object_text(text: str) -> str | None:
    """From the first "{" to the last "}": the object with whatever prose the model put around
    it. (The regular expression `\\{.*\\}` said the same, but rescanned the rest of the answer
    from every "{", quadratic in the answer's size.)"""
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if start != -1 and end > start else None


def parse_answer(text: str, *, candidate_ids: set[int]) -> Enrichment:
    """Read Claude's JSON; anything off-contract raises UnparseableAnswer."""
    candidate = _json_object_text(text or "")
    if candidate is None:
        raise UnparseableAnswer("no JSON object in the answer")
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError as exc:
        raise UnparseableAnswer(f"invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise UnparseableAnswer("the answer is not a JSON object")

    note_type = data.get("type")
    tags = data.get("tags", [])
    summary = data.get("summary", "")
    connections = data.get("connections", [])
    if not isinstance(note_type, str) or not isinstance(summary, str):
        raise UnparseableAnswer("type and summary must be strings")
    if not isinstance(tags, list) or not isinstance(connections, list):
        raise UnparseableAnswer("tags and connections must be lists")

    clean_tags = []
    for tag in tags:
        if isinstance(tag, str) and tag.strip("# ").strip():
            clean_tags.append(tag.strip("# ").strip().lower()[:64])
    # Only ids we offered: the model must not link notes of other users or invented ids.
    clean_connections = [
        int(c) for c in connections if isinstance(c, int) and not isinstance(c, bool) and c in candidate_ids
    ]
    return Enrichment(
        note_type=note_type.lower() if note_type.lower() in NoteType.values else NoteType.NOTE,
        tags=list(dict.fromkeys(clean_tags))[:MAX_TAGS],
        summary=" ".join(summary.split())[:500],
        connections=list(dict.fromkeys(clean_connections)),
    )
