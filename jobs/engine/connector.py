"""The worker's database connections: Procrastinate's psycopg pool, checked only when it matters,
and quick to reconnect after a database restart.

Procrastinate's pool checks every connection each time it is taken (an empty query: one more
round trip per claim and per batch of completions). Here a connection is checked only when it
has sat idle for CHECK_IDLE_SECONDS, which is when a database restart or a network cut may have
broken it; one in constant use proves itself on every query.

While the database is down, psycopg's pool retries each lost connection with an exponential
backoff (1, 2, 4, 8 s...), so a worker could sit idle for seconds after the server is back.
Here the delay between attempts stops growing at RECONNECT_MAX_DELAY.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import psycopg
import psycopg_pool
from procrastinate import PsycopgConnector
from procrastinate import utils as procrastinate_utils
from procrastinate.contrib.django import utils
from psycopg_pool.base import AttemptWithBackoff

from config.database import direct_connection_params, use_direct_database

CHECK_IDLE_SECONDS = 2.0
RECONNECT_MAX_DELAY = 0.5
POOL_ERROR_LOG_SECONDS = 10.0

_returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = weakref.WeakKeyDictionary()


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the database cannot be reached right now: refused
    or dropped connections, a server shutting down or starting up, no connection from the pool
    in time. Such errors pass; anything else is a bug or a real SQL error."""
    for cause in procrastinate_utils.causes(exc):
        if isinstance(cause, psycopg_pool.PoolClosed | psycopg.errors.IntegrityError | psycopg.errors.ProgrammingError):
            return False  # the worker is closing its pool, or the statement itself is wrong
        if isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError | ConnectionError):
            return True
    return False


class _CappedBackoff(AttemptWithBackoff):
    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX_DELAY)


class WorkerPool(psycopg_pool.AsyncConnectionPool):
    async def putconn(self, conn: psycopg.AsyncConnection) -> None:
        # The time of return is noted here, not in a `reset` callback: with one, psycopg_pool
        # returns connections through a background task, which a close() right after drops,
        # leaving that connection (and its server session) open for good.
        _returned_at[conn] = time.monotonic()
        await super().putconn(conn)

    async def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        # psycopg_pool's own method with our attempt object (its backoff is not a parameter).
        await super()._add_connection(attempt or _CappedBackoff(timeout=self.reconnect_timeout), growing=growing)


class _QuietReconnects(logging.Filter):
    """psycopg's pool logs each failed connection attempt, several a second with our backoff:
    one line per POOL_ERROR_LOG_SECONDS says as much."""

    def __init__(self) -> None:
        super().__init__()
        self._logged_at = -POOL_ERROR_LOG_SECONDS

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("error connecting"):
            return True
        now = time.monotonic()
        if now - self._logged_at < POOL_ERROR_LOG_SECONDS:
            return False
        self._logged_at = now
        return True


_pool_logger = logging.getLogger("psycopg.pool")
if not any(isinstance(f, _QuietReconnects) for f in _pool_logger.filters):
    _pool_logger.addFilter(_QuietReconnects())


async def _check_when_idle(conn: psycopg.AsyncConnection) -> None:
    if time.monotonic() - _returned_at.get(conn, 0.0) >= CHECK_IDLE_SECONDS:
        await psycopg_pool.AsyncConnectionPool.check_connection(conn)


PREPARE_THRESHOLD = 5  # psycopg's default: a statement is prepared on its fifth execution


def worker_pool(**kwargs: Any) -> psycopg_pool.AsyncConnectionPool:
    """The pool the worker's PsycopgConnector builds (its `pool_factory`), see `_configure`."""
    return WorkerPool(**{**kwargs, "check": _check_when_idle, "configure": _configure})


async def _configure(conn: psycopg.AsyncConnection) -> None:
    """Each new connection of the worker's pool (through `configure`, not the connection's
    kwargs: Procrastinate opens its LISTEN connection with the pool's kwargs plus
    autocommit=True, which would then be given twice).

    - Autocommit: every statement Procrastinate and the engine send through the pool is one
      statement on its own (a claim, a batch of completions, a heartbeat), which psycopg
      otherwise wraps in BEGIN and COMMIT, two more round trips each.
    - Prepared statements: the pool takes Django's connection parameters, and Django turns
      psycopg's prepared statements off (prepare_threshold None), so PostgreSQL planned every
      claim and every batch of completions afresh, about 0.4 ms each. The claim's LIMIT is
      literal so that its generic plan walks the claim index (jobs/engine/manager.py). Behind
      PgBouncer in transaction mode this needs PgBouncer 1.21+ with max_prepared_statements.
    - No sorts where an index gives the order: the claim must walk the claim index (a few
      entries per claim) whatever the statistics say. After ANALYZE saw an empty or finished
      queue, PostgreSQL estimates one waiting job, and both the generic and the custom plan then
      read every waiting job through any small partial index and sort them: one claim per few
      jobs, each reading the whole backlog (3 s a claim at 3,000 e-mails). Only the engine's own
      statements run on this pool; where a sort is the only plan it is still taken.
    - Prepared statements keep their generic plan: with sorts off, the generic plan of a batch
      of completions costs a little more on paper than a custom one, and PostgreSQL then planned
      every batch afresh (`plans` equal to `calls` in pg_stat_statements). The engine's
      statements are written for their generic plans (the claim's literal LIMIT, arrays)."""
    await conn.set_autocommit(True)
    conn.prepare_threshold = PREPARE_THRESHOLD
    await conn.execute("SET enable_sort = off; SET plan_cache_mode = force_generic_plan")


def worker_connector() -> PsycopgConnector:
    """What `manage.py procrastinate worker` runs on (Procrastinate's own, but for the pool).

    Behind a pooler the worker connects to DATABASE_DIRECT_URL, its Django connection included
    (config/database.py): prepared statements, LISTEN and session settings need a session."""
    use_direct_database()
    return PsycopgConnector(
        pool_factory=worker_pool, kwargs=direct_connection_params(utils.connector_params("default"))
    )
