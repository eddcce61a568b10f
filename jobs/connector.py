"""The worker's database connections: Procrastinate's psycopg pool, checked only when it matters.

Procrastinate's pool checks every connection each time it is taken (an empty query: one more
round trip per claim and per batch of completions). Here a connection is checked only when it
has sat idle for CHECK_IDLE_SECONDS, which is when a database restart or a network cut may have
broken it; one in constant use proves itself on every query.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import psycopg
import psycopg_pool
from procrastinate import PsycopgConnector
from procrastinate.contrib.django import utils

CHECK_IDLE_SECONDS = 2.0

_returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = weakref.WeakKeyDictionary()


async def _check_when_idle(conn: psycopg.AsyncConnection) -> None:
    if time.monotonic() - _returned_at.get(conn, 0.0) >= CHECK_IDLE_SECONDS:
        await psycopg_pool.AsyncConnectionPool.check_connection(conn)


async def _note_return(conn: psycopg.AsyncConnection) -> None:
    _returned_at[conn] = time.monotonic()


def _pool(**kwargs: Any) -> psycopg_pool.AsyncConnectionPool:
    return psycopg_pool.AsyncConnectionPool(**{**kwargs, "check": _check_when_idle, "reset": _note_return})


def worker_connector() -> PsycopgConnector:
    """What `manage.py procrastinate worker` runs on (Procrastinate's own, but for the pool check)."""
    return PsycopgConnector(pool_factory=_pool, kwargs=utils.connector_params("default"))
