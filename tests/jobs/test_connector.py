"""The worker's connection pool (jobs/engine/connector.py)."""

from __future__ import annotations

import asyncio

import pytest

from jobs.engine.connector import worker_connector
from tests.helpers import wait_for
from tests.jobs.workers import query

pytestmark = pytest.mark.django_db(transaction=True)


def _alive(pid: int) -> bool:
    return bool(query("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])[0][0])


def test_closing_the_pool_closes_a_connection_returned_just_before():
    async def use_then_close() -> bool:
        connector = worker_connector()
        await connector.open_async()
        async with connector.pool.connection() as connection:  # kept: a listener, a caller's variable
            pid = connection.info.backend_pid
        await connector.close_async()  # at once: before any background task of the pool could run
        # Still in the event loop that used the pool (as a worker or a test suite goes on): the
        # session of a closed connection ends within milliseconds, a leaked one stays.
        await asyncio.to_thread(
            wait_for, lambda: not _alive(pid), timeout=10, what="the returned connection's session to end"
        )
        return connection.closed

    assert asyncio.run(use_then_close())
