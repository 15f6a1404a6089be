"""The physical floor: a bare WebSocket round trip on the same machine, measured during the same run.

``python -m loadtest.floor`` is an echo server (the ``websockets`` library, nothing else) on a loopback port;
it prints ``port N`` once listening. Probes in the load-test process send a message the size of a protocol
``text`` message and time the echo of a reply the size of an Opus ``audio`` message. TTFA minus this floor is
what the gateway adds to a round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import select
import subprocess
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from loadtest.record import Recorder

PROBE_BYTES = 48  # about a msgpack `text` message carrying one token
REPLY_BYTES = 110  # about a msgpack `audio` message carrying one 20 ms Opus packet at 32 kb/s


async def _echo(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            await ws.send(bytes(message[:1]) * REPLY_BYTES)


async def _serve(port: int, compression: bool) -> None:
    async with serve(_echo, "127.0.0.1", port, compression="deflate" if compression else None, max_size=1 << 16) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"port {bound}", flush=True)
        await server.serve_forever()


class EchoServer:
    """The echo server in a process of its own (so it never shares the load test's event loop)."""

    def __init__(self, compression: bool, timeout_s: float = 20.0) -> None:
        cmd = [sys.executable, "-m", "loadtest.floor", "--port", "0"] + (["--compression"] if compression else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        self.port = 0
        for _ in range(100):  # bounded by count and by time (select waits at most until the deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.proc.stdout], [], [], remaining)[0]:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("port "):
                self.port = int(line.split()[1])
                break
        if not self.port:
            self.stop()
            raise RuntimeError("the floor echo server did not start")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def probe(
    url: str, index: int, rec: Recorder, until: float, interval_s: float, seed: int, compression: bool
) -> None:
    """Round trips every ``interval_s`` (with a seeded phase) until recorder time ``until``."""
    rng = random.Random(f"floor:{seed}:{index}")
    payload = bytes([index % 256]) * PROBE_BYTES
    try:
        async with connect(url, compression="deflate" if compression else None, proxy=None, ping_interval=None,
                           open_timeout=10, close_timeout=2) as ws:
            await asyncio.sleep(rng.uniform(0, interval_s))
            for _ in range(int((until - rec.now()) / interval_s) + 2):  # bounded by count and by time
                if rec.now() >= until:
                    return
                sent = rec.now()
                await ws.send(payload)
                await asyncio.wait_for(ws.recv(), 10.0)
                now = rec.now()
                rec.event("floor", sent, index, round((now - sent) * 1000.0, 3))
                await asyncio.sleep(max(0.0, interval_s * rng.uniform(0.5, 1.5) - (rec.now() - sent)))
    except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
        rec.event("err", rec.now(), -1 - index, "floor", f"{type(exc).__name__}: {exc}", False)


def main() -> None:
    parser = argparse.ArgumentParser(description="bare WebSocket echo server for the load test's floor")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--compression", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.compression))


if __name__ == "__main__":
    main()
