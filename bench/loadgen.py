"""An open-loop HTTP load generator for 127.0.0.1: requests are sent on a fixed schedule, and each
latency is measured from when its request was due (so a slow server cannot hide its queueing)."""

from __future__ import annotations

import http.client
import queue
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # anything but a 2xx: connection errors, timeouts, 4xx, 5xx

    @property
    def sent(self) -> int:
        return len(self.latencies_ms)


def run_load(
    *,
    port: int,
    path: str,
    requests: list[tuple[bytes, dict[str, str]]],
    rate: float,
    seconds: float,
    connections: int = 32,
) -> LoadResult:
    result = LoadResult()
    lock = threading.Lock()
    due: queue.Queue[tuple[float, int] | None] = queue.Queue()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while (item := due.get()) is not None:
            at, n = item
            body, headers = requests[n % len(requests)]  # the clients' requests, in turn
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            status = 0
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            latency = (time.perf_counter() - at) * 1000
            with lock:
                result.latencies_ms.append(latency)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if not 200 <= status < 300:
                    result.errors += 1
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    start = time.perf_counter() + 0.2
    for i in range(int(rate * seconds)):
        due.put((start + i / rate, i))
    for _ in threads:
        due.put(None)
    for thread in threads:
        thread.join(timeout=seconds + 30)
    result.latencies_ms.sort()
    return result
