"""The web server's request handler: Django's ASGI handler with the middleware chain in sync mode,
and a request's thread lent from a pool instead of started and joined for it.

Every view but the job streams is sync. In async mode (how Django's ASGI handler loads its
middleware) Django runs each middleware that can do both on the event loop and hops to the
request's thread for each of its hooks (process_request, process_response...), and once more
for the view: about fifteen thread hops a request, which cost more CPU time than the view itself
(docs/performance.md, "HTTP requests"). Loaded in sync mode, the middleware and the view run in
one hop to the request's thread; the streams' async views keep Django's own handler and its
async chain (config/asgi.py, jobs/console/stream.py).

Django gives each request a thread of its own (asgiref's `ThreadSensitiveContext`: its signals,
middleware, view and response all run there), and asgiref starts that thread for the request and
another one to join it when the request ends: two thread starts per request. Here each request
borrows an idle single-thread executor through asgiref's public `ThreadSensitiveContext(executor=)`
and gives it back when it ends, so one request still runs in one thread, and a thread serves one
request at a time.

`load_middleware` and `_middleware_chain` are Django's internals, listed in the engine's
boundary (jobs/engine/boundary.py) and checked at start-up.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.handlers.asgi import ASGIHandler

# Idle request threads kept per process; more requests at once start threads of their own, which
# end with their request.
IDLE_REQUEST_THREADS = 32


class RequestThreads:
    """Single-thread executors lent to one request at a time. Lent and given back on the event
    loop's thread only, so the list needs no lock."""

    def __init__(self, keep: int = IDLE_REQUEST_THREADS) -> None:
        self.keep = keep
        self.idle: list[ThreadPoolExecutor] = []

    def lend(self) -> ThreadPoolExecutor:
        if self.idle:
            return self.idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        if len(self.idle) < self.keep:
            self.idle.append(executor)
        else:
            executor.shutdown(wait=False)


class SyncChainASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self.request_threads = RequestThreads()

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)
        # The request's own thread (ThreadSensitiveContext, as Django's async chain uses).
        self._middleware_chain = sync_to_async(self._middleware_chain, thread_sensitive=True)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)  # Django's own refusal
        executor = self.request_threads.lend()
        try:
            # Django's handle() awaits every call it sends to the request's thread before it
            # returns; after an error the thread is not trusted again.
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self.request_threads.give_back(executor)
