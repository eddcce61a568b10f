"""The web server's request handler (config/handler.py): a request's middleware and view run in
one hop to its thread, not one hop per middleware hook."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref import sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import ASGIHandler

from config.handler import RequestThreads, SyncChainASGIHandler

pytestmark = pytest.mark.django_db(transaction=True)


def _request(handler, path: str, *, times: int = 1) -> tuple[int, int]:
    """The status of GET `path` through `handler` (`times` in turn, on one event loop), and how
    many sync_to_async hops it took."""
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
        for _ in range(times):
            communicator = ApplicationCommunicator(handler, scope)
            await communicator.send_input({"type": "http.request", "body": b""})
            start = await communicator.receive_output(10)
            while (await communicator.receive_output(10)).get("more_body"):
                pass
            await communicator.wait(10)  # the request's end (its response closed)
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


def test_more_idle_request_threads_than_kept_are_shut_down():
    threads = RequestThreads(keep=1)
    first, second = threads.lend(), threads.lend()
    assert first is not second
    threads.give_back(first)
    threads.give_back(second)
    assert threads.idle == [first]
    with pytest.raises(RuntimeError):  # shut down: it takes no more work
        second.submit(print)
    assert threads.lend() is first
