"""The web server's application (the Dockerfile runs it with gunicorn's UvicornWorker).

Sync views and middleware run in threads; the job stream (jobs/console/stream.py) runs on the event loop."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.handler import SyncChainASGIHandler
from config.startup import fail_fast_if_database_unreachable, use_connection_pool

fail_fast_if_database_unreachable()
use_connection_pool()
# Every request but the job streams: middleware and view in one hop (config/handler.py).
stream_application = get_asgi_application()  # django.setup(), and the async chain for the streams
django_application = SyncChainASGIHandler()

from jobs.console.stream import serve_streams_without_request_thread  # noqa: E402 (needs the apps loaded)

application = serve_streams_without_request_thread(django_application, streams=stream_application)
