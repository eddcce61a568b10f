"""Django's database cache (the project's `default` cache), with each write in one statement.

Django's DatabaseCache.set() counts the whole table (to cull it), then reads the key and updates
or inserts it inside a transaction: five round trips, one of them a COUNT(*) over every entry
(DRF's throttles wrote their counter that way on every API request, until they got their own
table, core/throttling.py). On PostgreSQL the write is one INSERT ... ON CONFLICT DO UPDATE.
Expired entries are deleted by the periodic purge (core.purge_expired), so nothing needs
counting here. Everything else is Django's.
"""

from __future__ import annotations

import base64
import pickle
from datetime import UTC, datetime

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.db import DatabaseCache
from django.db import connections, router


class PostgresDatabaseCache(DatabaseCache):
    def _base_set(self, mode, key, value, timeout=DEFAULT_TIMEOUT):
        if mode != "set":
            return super()._base_set(mode, key, value, timeout)
        timeout = self.get_backend_timeout(timeout)
        connection = connections[router.db_for_write(self.cache_model_class)]
        expires = datetime.max if timeout is None else datetime.fromtimestamp(timeout, tz=UTC)
        expires = connection.ops.adapt_datetimefield_value(expires.replace(microsecond=0))
        encoded = base64.b64encode(pickle.dumps(value, self.pickle_protocol)).decode("latin1")
        table = connection.ops.quote_name(self._table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (cache_key, value, expires) VALUES (%s, %s, %s)"
                " ON CONFLICT (cache_key) DO UPDATE SET value = EXCLUDED.value, expires = EXCLUDED.expires",
                [key, encoded, expires],
            )
        return True
