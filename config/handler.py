"""The web server's request handler: Django's ASGI handler with the middleware chain in sync mode,
and a request's thread lent from a pool instead of started and joined for it.

Every view but the job streams is sync. In async mode (how Django's ASGI handler loads its
middleware) Django runs each middleware that can do both on the event loop and hops to the
request's thread for each of its hooks (process_request, process_response...), and once more
for the view: about fifteen thread hops a request, which cost more CPU time than the view itself
(docs/performance.md, the levers of 2026-12-04 and 2026-12-08). Loaded in sync mode, the
middleware and the view run in one hop to the request's thread; the streams' async views keep
Django's own handler and its async chain (config/asgi.py, jobs/console/stream.py).

Django gives each request a thread of its own (asgiref's `ThreadSensitiveContext`: its signals,
middleware, view and response all run there), and asgiref starts that thread for the request and
another one to join it when the request ends: two thread starts per request. Here each request
borrows an idle single-thread executor through asgiref's public `ThreadSensitiveContext(executor=)`
and gives it back when it ends, so one request still runs in one thread, and a thread serves one
request at a time. And there are at most WEB_REQUEST_THREADS of them per process: a burst used to
start a thread per request in flight (25-30 in each process at 200 requests/s), which then took
turns at the one interpreter lock, each switch paid in CPU time; now the requests beyond the
limit wait on the event loop, which costs nothing, for at most DATABASE_POOL_TIMEOUT_SECONDS
(what a request waits for a database connection), then get a 503 with Retry-After.

`load_middleware` and `_middleware_chain` are Django's internals, listed in the engine's
boundary (jobs/engine/boundary.py) and checked at start-up.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

from core.middleware import retry_later_response


class RequestThreads:
    """At most `limit` single-thread executors, each lent to one request at a time; a request
    that finds them all lent waits on the event loop for one. Lent and given back on the event
    loop's thread only, so nothing here needs a lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.started = 0
        self.idle: list[ThreadPoolExecutor] = []
        self.waiting: collections.deque[asyncio.Future[ThreadPoolExecutor]] = collections.deque()

    def lend_now(self) -> ThreadPoolExecutor | None:
        """An idle executor, or a new one under the limit; None when all are lent."""
        if self.idle:
            return self.idle.pop()
        if self.started < self.limit:
            self.started += 1
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")
        return None

    async def lend(self) -> ThreadPoolExecutor:
        """An executor, waiting for one given back when all are lent."""
        executor = self.lend_now()
        if executor is not None:
            return executor
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed one just as it was cancelled
                self.give_back(waiter.result())
            raise

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(executor)
                return
        self.idle.append(executor)

    def discard(self, executor: ThreadPoolExecutor) -> None:
        executor.shutdown(wait=False)
        self.started -= 1


class SyncChainASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self.request_threads = RequestThreads(limit=settings.WEB_REQUEST_THREADS)

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)
        # The request's own thread (ThreadSensitiveContext, as Django's async chain uses).
        self._middleware_chain = sync_to_async(self._middleware_chain, thread_sensitive=True)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)  # Django's own refusal
        # Without a task and a timer for the wait when a thread is free (nearly every request).
        executor = self.request_threads.lend_now()
        if executor is None:
            try:
                executor = await asyncio.wait_for(self.request_threads.lend(), settings.DATABASE_POOL_TIMEOUT_SECONDS)
            except TimeoutError:
                # Every thread is held (most likely by requests waiting for the database): the
                # same quick 503 as a request that waits that long for a connection, never a hang.
                return await self.send_response(retry_later_response("The server is busy"), send)
        try:
            # Django's handle() awaits every call it sends to the request's thread before it
            # returns; after an error the thread is not trusted again.
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        except BaseException:
            self.request_threads.discard(executor)
            raise
        self.request_threads.give_back(executor)
