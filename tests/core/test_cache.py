"""The database cache's one-statement write (core/cache.py) behaves as Django's."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext

pytestmark = pytest.mark.django_db


def test_set_get_overwrite_and_delete():
    cache.set("k", {"n": 1}, 60)
    assert cache.get("k") == {"n": 1}
    cache.set("k", [1, 2, 3], 60)
    assert cache.get("k") == [1, 2, 3]
    cache.delete("k")
    assert cache.get("k") is None


def test_an_expired_entry_is_gone_and_none_timeout_never_expires():
    cache.set("short", "v", -1)  # already expired
    assert cache.get("short") is None
    cache.set("forever", "v", None)
    assert cache.get("forever") == "v"


def test_a_write_is_one_statement_without_counting_the_table():
    cache.set("warm", 1, 60)
    with CaptureQueriesContext(connection) as queries:
        cache.set("warm", 2, 60)
    [write] = [q["sql"] for q in queries.captured_queries]
    assert "ON CONFLICT" in write and "COUNT" not in write.upper()
    assert cache.get("warm") == 2
