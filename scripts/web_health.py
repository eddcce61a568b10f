"""The health check of a web container: `python scripts/web_health.py`, standard library only.

GET /api/health/ on 127.0.0.1:8000 (the image's bind; another port as the one argument), as a
load balancer would: with a Host header from ALLOWED_HOSTS and, when SECURE_PROXY_SSL_HEADER
is set, the header the TLS proxy would add (else SECURE_SSL_REDIRECT answers a redirect). Exits 0 when the web
server answers and reaches the database: a 200, or a 503 that only says no worker is live
(that is the workers' health, and restarting the web would not help); otherwise 1, with the
reason on one line.
"""

from __future__ import annotations

import http.client
import json
import os
import sys


def _host() -> str:
    for host in os.environ.get("ALLOWED_HOSTS", "").split(","):
        host = host.strip().lstrip(".")
        if host and host != "*":
            return host
    return "localhost"


def _headers() -> dict[str, str]:
    headers = {"Host": _host(), "Accept": "application/json"}
    header, _, value = os.environ.get("SECURE_PROXY_SSL_HEADER", "").partition(",")
    if header.strip() and value.strip():
        headers[header.strip()] = value.strip()
    return headers


def check(port: int, timeout: float = 5.0) -> str | None:
    """None when healthy, else why not."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/api/health/", headers=_headers())
        response = connection.getresponse()
        body = response.read()
    except OSError as exc:
        return f"no answer on 127.0.0.1:{port}: {exc}"
    finally:
        connection.close()
    if response.status == 200:
        return None
    try:
        health = json.loads(body)
    except ValueError:
        health = {}
    if response.status == 503 and health.get("database") == "up":
        return None  # up and reaching the database; only the workers are missing
    reasons = "; ".join(health.get("reasons", [])) if isinstance(health, dict) else ""
    return f"/api/health/ answered {response.status} {reasons}".strip()


def main() -> int:
    problem = check(int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
    if problem is None:
        print("healthy")
        return 0
    print(f"unhealthy: {problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
