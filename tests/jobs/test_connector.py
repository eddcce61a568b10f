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


def test_the_pool_runs_each_statement_alone_and_prepares_the_repeated_ones():
    """A claim is one round trip (no BEGIN and COMMIT around it) and is planned once per
    connection, not on every execution (Django's connection parameters turn preparing off)."""
    from jobs.engine.manager import CLAIM_JOBS, PRIORITY_ORDER

    claim = CLAIM_JOBS.format(limit=3, order=PRIORITY_ORDER)

    async def claim_six_times() -> tuple[bool, list]:
        connector = worker_connector()
        await connector.open_async()
        try:
            async with connector.pool.connection() as connection:
                autocommit = connection.autocommit
                for _ in range(6):
                    await connector.execute_query_all_async_with_connection(
                        connection, claim, queues=["nothing-here"], worker_id=0
                    )
                cursor = await connection.execute(
                    "SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s", ["%candidates AS%"]
                )
                return autocommit, await cursor.fetchall()
        finally:
            await connector.close_async()

    autocommit, prepared = asyncio.run(claim_six_times())
    assert autocommit
    assert len(prepared) == 1
