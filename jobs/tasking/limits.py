"""A time limit for a task's work: past it the job fails (and follows its retry policy)
instead of running on in the worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import connection

T = TypeVar("T")


class TimeLimitExceeded(Exception):
    permanent = False  # a retry may well finish in time


def call_with_time_limit(func: Callable[..., T], *, seconds: float, **kwargs: Any) -> T:
    """Run `func(**kwargs)` and give up waiting after `seconds`.

    Python cannot kill a thread: work still running at the limit finishes in the background
    with its own database connection, so `func` must be idempotent (write with upsert or a
    conditional update). The job itself fails at the limit and is not left `doing`.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = func(**kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target, name=f"time-limited {getattr(func, '__name__', func)}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeLimitExceeded(f"{getattr(func, '__name__', 'task')} still running after {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
