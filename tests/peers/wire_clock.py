"""A PostgreSQL proxy and an SMTP server in a process of their own, stamping on the machine's
monotonic clock when a COMMIT reaches the database and when a message's final dot reaches the
mail server.

It runs in its own process so that what it measures in the sender (which thread holds the GIL
between the two writes) does not delay its own clock.

    python -m tests.peers.wire_clock PG_HOST PG_PORT

prints one JSON line {"pg_port": ..., "smtp_port": ...}, then on each line read from stdin
prints {"commits": [...], "dots": [...]} (seconds, time.monotonic()) and exits at end of input.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

COMMITS: list[float] = []
DOTS: list[float] = []


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, stamp: bool) -> None:
    tail = b""
    try:
        while chunk := await reader.read(65536):
            seen = time.monotonic()
            if stamp and b"COMMIT" in tail + chunk:
                COMMITS.append(seen)
            tail = chunk[-8:]
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _proxy(client_reader, client_writer, *, host: str, port: int) -> None:
    server_reader, server_writer = await asyncio.open_connection(host, port)
    await asyncio.gather(
        _pipe(client_reader, server_writer, stamp=True), _pipe(server_reader, client_writer, stamp=False)
    )


async def _smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Just enough SMTP for one client: every command accepted, a DATA ends at its dot."""

    def reply(line: str) -> None:
        writer.write(line.encode() + b"\r\n")

    reply("220 wire-clock ESMTP")
    try:
        while line := await reader.readline():
            command = line.strip().upper()
            if command.startswith((b"EHLO", b"HELO")):
                reply("250-wire-clock")
                reply("250 8BITMIME")
            elif command == b"DATA":
                reply("354 end with <CRLF>.<CRLF>")
                await writer.drain()
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                DOTS.append(time.monotonic())
                reply("250 2.0.0 queued")
            elif command == b"QUIT":
                reply("221 bye")
                await writer.drain()
                break
            else:
                reply("250 ok")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(pg_host: str, pg_port: int) -> None:
    proxy = await asyncio.start_server(lambda r, w: _proxy(r, w, host=pg_host, port=pg_port), "127.0.0.1", 0)
    smtp = await asyncio.start_server(_smtp, "127.0.0.1", 0)
    ports = {"pg_port": proxy.sockets[0].getsockname()[1], "smtp_port": smtp.sockets[0].getsockname()[1]}
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps({"commits": COMMITS, "dots": DOTS}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
