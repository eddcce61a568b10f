"""Light SMTP sinks for throughput runs: they count what they receive and parse nothing, so the
measurement is of the sender, not of the sink's e-mail parser (the tests' sink parses every
message into an EmailMessage, which costs about a millisecond each).

`CountingSmtpSink` is aiosmtpd in this process (about 650 us of CPU per message here);
`PostfixSmtpSink` is Postfix's own test server, `smtp-sink`, in C (about 190 us), for the
figures where the sink shares the two cores with the workers it measures."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from aiosmtpd.controller import Controller

from bench.harness import port_open

_NOTIFICATION = re.compile(rb"^X-Secondbrain-Notification: *(\d+)", re.MULTILINE)


class CountingSmtpSink:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.received_at: list[float] = []
        self.notification_ids: list[int] = []
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope) -> str:
        found = _NOTIFICATION.search(envelope.content)
        with self._lock:
            self.received_at.append(time.monotonic())
            self.notification_ids.append(int(found.group(1)) if found else 0)
        return "250 2.0.0 Ok"

    def start(self) -> CountingSmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    pid = None  # in the bench's own process: its CPU is not metered apart

    @property
    def count(self) -> int:
        return len(self.received_at)


# Postfix's smtp-sink, taken from Debian's postfix package without installing it (no daemon,
# no mail system on the machine): the package unpacked under .data/postfix on first use.
_POSTFIX_DIR = Path(__file__).resolve().parent.parent / ".data" / "postfix"
_POSTFIX_BINARY = _POSTFIX_DIR / "usr" / "sbin" / "smtp-sink"


def postfix_smtp_sink() -> Path | None:
    """The smtp-sink binary, unpacked from Debian's package when missing; None when there is
    neither apt nor dpkg (then the figure falls back to the Python sink and says so)."""
    if _POSTFIX_BINARY.exists():
        return _POSTFIX_BINARY
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    with tempfile.TemporaryDirectory() as download:
        fetched = subprocess.run(["apt-get", "download", "postfix"], cwd=download, capture_output=True)
        if fetched.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True)
            fetched = subprocess.run(["apt-get", "download", "postfix"], cwd=download, capture_output=True)
        packages = list(Path(download).glob("postfix_*.deb"))
        if fetched.returncode != 0 or not packages:
            return None
        subprocess.run(["dpkg-deb", "-x", str(packages[0]), str(_POSTFIX_DIR)], check=True)
    return _POSTFIX_BINARY if _POSTFIX_BINARY.exists() else None


class PostfixSmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, appending every message to one dump file, which a thread
    reads as it grows: the arrival times are those of the reads (every 2 ms)."""

    POLL_SECONDS = 0.002

    def __init__(self, binary: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._binary = binary
        self._dir = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self._dir, 0o777)  # smtp-sink started by root drops to nobody, who writes the dump
        self._dump = Path(self._dir) / "dump"
        self.received_at: list[float] = []
        self.notification_ids: list[int] = []
        self._process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> PostfixSmtpSink:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        env = {**os.environ, "LD_LIBRARY_PATH": str(self._binary.parent.parent / "lib" / "postfix")}
        self._process = subprocess.Popen(
            [str(self._binary), *user, "-D", str(self._dump), f"127.0.0.1:{self.port}", "256"], env=env
        )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink did not start (exit {self._process.poll()})")
            time.sleep(0.01)
        self._reader = threading.Thread(target=self._read, name="smtp-sink-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        offset, rest = 0, b""
        while True:
            stopping = self._stopping.is_set()
            try:
                with open(self._dump, "rb") as dump:
                    dump.seek(offset)
                    chunk = dump.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                now = time.monotonic()
                complete, _, rest = (rest + chunk).rpartition(b"\n")
                for found in _NOTIFICATION.finditer(complete):
                    self.notification_ids.append(int(found.group(1)))
                    self.received_at.append(now)
            if stopping:
                return
            time.sleep(self.POLL_SECONDS)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
        self._stopping.set()
        if self._reader is not None:
            self._reader.join(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def count(self) -> int:
        return len(self.received_at)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None
