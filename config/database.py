"""The direct database connection, for what cannot go through a pooler in transaction mode.

With DATABASE_DIRECT_URL set to another URL than DATABASE_URL (config/settings.py), DATABASE_URL
is a pooler's (PgBouncer, pool_mode=transaction) and these connect to PostgreSQL itself:

- the worker, all of it: its Procrastinate pool prepares statements and LISTENs, and its
  Django connection (the tasks' ORM queries) gets the session settings (startup options);
- the web's job streams (jobs/console/stream_hub.py): LISTEN and session advisory locks.

Without a pooler both are DATABASES["default"], unchanged (the test database in tests).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connections

# Keys of Django's OPTIONS that are not libpq's (Django's own get_connection_params drops them).
_DJANGO_ONLY_OPTIONS = ("isolation_level", "server_side_binding", "assume_role", "pool")


def direct_connection_params(params: dict[str, Any]) -> dict[str, Any]:
    """psycopg's connection parameters `params` (Django's, for the default database) with the
    direct URL's host, port, database, user, password and options in place of the pooler's."""
    direct = settings.DATABASE_DIRECT
    if direct is None:
        return params
    params = {**params}
    params.pop("options", None)  # the pooler's, if any: the direct URL's come below
    options = {k: v for k, v in direct["OPTIONS"].items() if k not in _DJANGO_ONLY_OPTIONS}
    params.update(options)
    for key, name in (
        ("NAME", "dbname"),
        ("USER", "user"),
        ("PASSWORD", "password"),
        ("HOST", "host"),
        ("PORT", "port"),
    ):
        params.pop(name, None)
        if direct[key]:
            params[name] = direct[key]
    return params


def use_direct_database() -> None:
    """For a worker process: its Django connection (the tasks' queries) goes to the direct URL
    too, so a worker never depends on the pooler. No-op without a pooler."""
    direct = settings.DATABASE_DIRECT
    if direct is None:
        return
    db = settings.DATABASES["default"]
    if db.get("HOST") == direct["HOST"] and db.get("PORT") == direct["PORT"] and db.get("NAME") == direct["NAME"]:
        return
    connections["default"].close()
    for key in ("NAME", "USER", "PASSWORD", "HOST", "PORT"):
        db[key] = direct[key]
    db["OPTIONS"] = {**db.get("OPTIONS", {}), **direct["OPTIONS"]}
