"""The web server's request handler: Django's ASGI handler with the middleware chain in sync mode.

Every view but the job streams is sync. In async mode (how Django's ASGI handler loads its
middleware) Django runs each middleware that can do both on the event loop and hops to the
request's thread for each of its hooks (process_request, process_response...), and once more
for the view: about fifteen thread hops a request, which cost more CPU time than the view itself
(docs/performance.md, "HTTP requests"). Loaded in sync mode, the middleware and the view run in
one hop to the request's thread; the streams' async views keep Django's own handler and its
async chain (config/asgi.py, jobs/console/stream.py).

`load_middleware` and `_middleware_chain` are Django's internals, listed in the engine's
boundary (jobs/engine/boundary.py) and checked at start-up.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler


class SyncChainASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)
        # The request's own thread (ThreadSensitiveContext, as Django's async chain uses).
        self._middleware_chain = sync_to_async(self._middleware_chain, thread_sensitive=True)
