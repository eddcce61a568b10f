"""One clock for every process: the database's.

Workers and web processes on different hosts disagree about the time by as much as their
clocks drift; PostgreSQL is the one thing they all share. Whatever several processes must
agree on (is a breaker still open, is a digest due, which month is the budget's, when does a
postponed job run) is decided by the database's clock: in SQL with `now()` where the decision
is a statement, or with `db_now()` read once per operation where it is Python.
"""

from __future__ import annotations

from datetime import datetime

from django.db import connection


def db_now() -> datetime:
    """The database's current time (aware, UTC): one round trip. Read it once per operation and
    pass it on, rather than mixing it with this host's clock."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]
