"""The web server's request handler (config/handler.py): a request's middleware and view run in
one hop to its thread, not one hop per middleware hook."""

from __future__ import annotations

import asyncio

import pytest
from asgiref import sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

from config.handler import SyncChainASGIHandler

pytestmark = pytest.mark.django_db(transaction=True)


def _request(handler, path: str) -> tuple[int, int]:
    """The status of GET `path` through `handler`, and how many sync_to_async hops it took."""
    hops = 0
    upstream_call = sync.SyncToAsync.__call__

    async def counting(self, *args, **kwargs):
        nonlocal hops
        hops += 1
        return await upstream_call(self, *args, **kwargs)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", settings.ALLOWED_HOSTS[0].encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }

    async def run() -> int:
        communicator = ApplicationCommunicator(handler, scope)
        await communicator.send_input({"type": "http.request", "body": b""})
        start = await communicator.receive_output(10)
        while (await communicator.receive_output(10)).get("more_body"):
            pass
        return start["status"]

    sync.SyncToAsync.__call__ = counting
    try:
        status = asyncio.run(run())
    finally:
        sync.SyncToAsync.__call__ = upstream_call
    return status, hops


def test_a_request_runs_its_middleware_and_view_in_a_few_hops_not_one_per_hook():
    ours_status, ours = _request(SyncChainASGIHandler(), "/api/notes/")
    django_status, django = _request(ASGIHandler(), "/api/notes/")
    assert ours_status == django_status == 401  # the same answer through the same middleware
    # Ours: request_started, the chain, the response's close. Django's async chain: one hop per
    # hook of each middleware that can do both, and the view's.
    assert ours <= 4
    assert django >= 3 * ours
