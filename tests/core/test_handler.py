"""The web server's request handler (config/handler.py): a request's middleware and view run in
one hop to its thread, not one hop per middleware hook."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from asgiref import sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import ASGIHandler

from config.handler import RequestThreads, SyncChainASGIHandler

pytestmark = pytest.mark.django_db(transaction=True)


def _scope(path: str) -> dict:
    return {
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


async def _get(handler, path: str) -> int:
    """The status of GET `path`, once the request has ended (its response closed)."""
    communicator = ApplicationCommunicator(handler, _scope(path))
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(10)
    while (await communicator.receive_output(10)).get("more_body"):
        pass
    await communicator.wait(10)
    return start["status"]


def _request(handler, path: str, *, times: int = 1) -> tuple[int, int]:
    """The status of GET `path` through `handler` (`times` in turn, on one event loop), and how
    many sync_to_async hops it took."""
    hops = 0
    upstream_call = sync.SyncToAsync.__call__

    async def counting(self, *args, **kwargs):
        nonlocal hops
        hops += 1
        return await upstream_call(self, *args, **kwargs)

    async def run() -> int:
        return [await _get(handler, path) for _ in range(times)][-1]

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


def test_requests_borrow_one_thread_in_turn_and_each_runs_wholly_in_its_thread():
    """Django's handler starts a thread for each request (and one more to join it); ours lends
    an idle one. A request's signals, middleware and view still share one thread."""
    seen: list[tuple[str, threading.Thread]] = []

    def started(**kwargs):
        seen.append(("started", threading.current_thread()))

    def finished(**kwargs):
        seen.append(("finished", threading.current_thread()))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    handler = SyncChainASGIHandler()
    try:
        assert _request(handler, "/api/notes/", times=3)[0] == 401
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert [event for event, _ in seen] == ["started", "finished"] * 3
    threads = {id(thread) for _, thread in seen}  # the Thread objects are kept alive by `seen`
    assert len(threads) == 1, "each request started a thread of its own"
    assert seen[0][1] is not threading.main_thread()
    assert len(handler.request_threads.idle) == 1


def test_a_request_waits_for_a_thread_when_all_are_lent_and_gets_the_one_given_back():
    async def run():
        threads = RequestThreads(limit=2)
        first, second = await threads.lend(), await threads.lend()
        assert first is not second and threads.started == 2
        third = asyncio.ensure_future(threads.lend())
        cancelled = asyncio.ensure_future(threads.lend())
        await asyncio.sleep(0)
        assert not third.done()
        cancelled.cancel()  # a request gone while it waited takes nothing
        threads.give_back(second)
        assert await third is second
        threads.give_back(first)
        assert threads.idle == [first] and threads.started == 2
        threads.discard(second)  # after an error: shut down, and a new one may start
        with pytest.raises(RuntimeError):
            second.submit(print)
        assert threads.started == 1
        assert await threads.lend() is first
        assert (await threads.lend()) not in (first, second)

    asyncio.run(run())


def test_concurrent_requests_share_at_most_the_limit_of_threads(settings):
    settings.WEB_REQUEST_THREADS = 2
    handler = SyncChainASGIHandler()
    threads: set[threading.Thread] = set()

    def started(**kwargs):
        threads.add(threading.current_thread())

    async def run() -> list[int]:
        return await asyncio.gather(*(_get(handler, "/api/notes/") for _ in range(8)))

    signals.request_started.connect(started)
    try:
        assert asyncio.run(run()) == [401] * 8
    finally:
        signals.request_started.disconnect(started)
    assert len(threads) == 2


def test_a_request_that_waits_too_long_for_a_thread_gets_a_quick_503(settings):
    settings.WEB_REQUEST_THREADS = 1
    settings.DATABASE_POOL_TIMEOUT_SECONDS = 0.2
    handler = SyncChainASGIHandler()

    async def run() -> tuple[dict, bytes, int]:
        held = await handler.request_threads.lend()  # a request stuck on the database, say
        communicator = ApplicationCommunicator(handler, _scope("/api/notes/"))
        await communicator.send_input({"type": "http.request", "body": b""})
        start = await communicator.receive_output(5)
        body = await communicator.receive_output(5)
        await communicator.wait(5)
        handler.request_threads.give_back(held)
        return start, body["body"], await _get(handler, "/api/notes/")

    start, body, after = asyncio.run(run())
    assert start["status"] == 503
    assert (b"Retry-After", str(settings.DATABASE_RETRY_AFTER_SECONDS).encode()) in start["headers"]
    assert json.loads(body)["detail"].startswith("The server is busy")
    assert after == 401  # the thread given back serves the next request
