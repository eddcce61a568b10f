from __future__ import annotations

import pytest

from notes.tier1 import analyse
from tests.complexity import assert_linear_on_hostile_text


def test_hashtags_are_lowercased_unique_and_ignore_link_fragments_and_headings():
    meta = analyse("#Idea about #postgres and #Postgres, see https://x.org/page#section and a#b")
    assert meta.tags == ["idea", "postgres"]
    assert meta.links == ["https://x.org/page#section"]


def test_links_lose_trailing_punctuation():
    assert analyse("Go to https://example.com/a, then http://b.org.").links == [
        "https://example.com/a",
        "http://b.org",
    ]


@pytest.mark.parametrize(
    ("content", "note_type"),
    [
        ("- [ ] buy milk", "task"),
        ("TODO: call mum", "task"),
        ("https://example.com/article", "link"),
        ("Idea: a queue in PostgreSQL", "idea"),
        ("Why does VACUUM matter?\nSome thoughts", "question"),
        ("Meeting with the platform team\nAttendees: A, B", "meeting"),
        ("> To be or not to be", "reference"),
        ("Just an ordinary thought about things", "note"),
    ],
)
def test_heuristic_type(content, note_type):
    assert analyse(content).note_type == note_type


def test_word_count():
    assert analyse("  one two\nthree\t four  ").word_count == 4


def test_tier1_is_linear_in_the_size_of_the_note():
    """100 KB of newlines took about 10 minutes (`^\\s*` under MULTILINE rescanned every
    following line from each line start); every hostile input now takes milliseconds."""
    assert_linear_on_hostile_text("from notes.tier1 import analyse", "analyse(text)")
