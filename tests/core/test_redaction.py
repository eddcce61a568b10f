from __future__ import annotations

import pytest

from core.redaction import redact
from tests.complexity import assert_linear_on_hostile_text


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("550 <bob@example.com>: no such user", "550 <[e-mail]>: no such user"),
        ("to a@b.com.x1@c.org now", "to [e-mail][e-mail] now"),
        ("first.last+tag@mail.example.co.uk, second@x.io", "[e-mail], [e-mail]"),
        ("postgres@127.0.0.1:5432 and user@host", "postgres@127.0.0.1:5432 and user@host"),
        ("a@@b.com @c.org d@e.f", "a@@b.com @c.org d@e.f"),
        ("key sk-ant-api03-abcdefgh1234 and sk-ant-short", "key [api key] and sk-ant-short"),
    ],
)
def test_addresses_and_keys_are_replaced(text, redacted):
    assert redact(text) == redacted


def test_redaction_is_linear_in_the_size_of_the_text():
    """A log line or job error of 300 KB without an e-mail address in it (letters, dots, a
    domain that never ends) took minutes: the address pattern restarted its local part at
    every character and ran to the end of the run each time."""
    assert_linear_on_hostile_text("from core.redaction import redact", "redact(text)", size=300_000)
