"""Where a latency run's handler records its start: one line per job, `<i> <start - sent_at>
<start>` in seconds (the start on the worker's time.time(), for the split the client makes),
appended to the file named by BENCH_STARTS_FILE (one os.write of a short line with O_APPEND, so
the worker's threads never interleave). Only the bench's latency figure passes `sent_at`; the
processing figure's jobs record nothing."""

from __future__ import annotations

import os
import threading

_fd: int | None = None
_lock = threading.Lock()


def record(i: int, sent_at: float, started: float) -> None:
    global _fd
    if _fd is None:
        with _lock:
            if _fd is None:
                _fd = os.open(os.environ["BENCH_STARTS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{i} {started - sent_at:.6f} {started:.6f}\n".encode())


def read_ms(path: str) -> list[float]:
    """The recorded waits, in milliseconds, sorted."""
    try:
        with open(path) as file:
            return sorted(float(line.split()[1]) * 1000 for line in file if line.strip())
    except FileNotFoundError:
        return []


def read_started(path: str) -> dict[int, float]:
    """Each job's start (the handler's time.time()) by its `i`."""
    try:
        with open(path) as file:
            return {int(fields[0]): float(fields[2]) for fields in (line.split() for line in file) if len(fields) > 2}
    except FileNotFoundError:
        return {}
