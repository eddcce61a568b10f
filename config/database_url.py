"""DATABASE_URL (and DATABASE_DIRECT_URL) into Django's settings, several hosts included.

A URL may list the primary and its standbys the way libpq does, so that every connection
(Django's, the web's pool, the worker's Procrastinate pool and LISTEN connection, the streams')
goes to whichever of them accepts writes:

    postgres://app@db1:5432,db2:5432/secondbrain?target_session_attrs=read-write

HOST becomes "db1,db2" and PORT "5432,5432"; psycopg tries the hosts in order and keeps the
first one that says it is read-write. django-environ splits such a netloc on its last colon
only, so "db1:5433,db2" would give both hosts port 5433, "[::1]" would keep its brackets, and an
empty or malformed host would pass: the hosts are read here instead, and a bad one stops the
start naming the variable. A URL with one host is django-environ's, unchanged.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

# libpq's values; psycopg checks each host against it (docs/reliability.md#failover).
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
_HOST_PORT = re.compile(r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]+))(?::(?P<port>[^:]*))?$")


def database_url_config(variable: str, url: str) -> dict[str, Any]:
    """Django's DATABASES entry for `url`, the value of the environment variable `variable`."""
    try:
        config = environ.Env.db_url_config(url)
    except (ValueError, KeyError) as exc:
        raise ImproperlyConfigured(f"{variable} is not a database URL ({exc})") from None
    hosts = _netloc_hosts(url)
    if len(hosts) > 1:
        config["HOST"], config["PORT"] = _host_and_port(variable, hosts)
    attrs = config.get("OPTIONS", {}).get("target_session_attrs")
    if attrs is not None and attrs not in TARGET_SESSION_ATTRS:
        raise ImproperlyConfigured(
            f"{variable}: target_session_attrs must be one of {', '.join(TARGET_SESSION_ATTRS)} (got {attrs!r})"
        )
    return config


def _netloc_hosts(url: str) -> list[str]:
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[2].split(",")


def _host_and_port(variable: str, hosts: list[str]) -> tuple[str, str]:
    """libpq's comma lists for several hosts: one port per host, empty for the default (5432)."""
    names, ports = [], []
    for item in hosts:
        match = _HOST_PORT.match(item)
        if match is None:
            raise ImproperlyConfigured(
                f"{variable}: {item!r} is not a host or host:port in its list of hosts (h1:5432,h2:5432)"
            )
        port = match["port"] or ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ImproperlyConfigured(f"{variable}: {port!r} is not a port number (in {item!r})")
        names.append(match["ipv6"] or unquote(match["name"]))
        ports.append(port)
    return ",".join(names), ",".join(ports)


def describe_hosts(host: str | None, port: str | int | None) -> str:
    """'db1:5432, db2:5433' for a message: each host with its port (5432 when none is given)."""
    names = (host or "localhost").split(",")
    ports = str(port or "").split(",")
    if len(ports) == 1:
        ports = ports * len(names)
    return ", ".join(f"{name}:{number or 5432}" for name, number in zip(names, ports, strict=False))
