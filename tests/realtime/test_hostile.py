"""Floods below the protocol, against a real `shoal serve`: sockets that never finish the HTTP handshake, a process
out of file descriptors, a client that reconnects with invalid frames as fast as it can. The server must close
what does not speak, back off instead of spinning, answer /healthz again once the flood ends, and keep its log
small."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import psutil
import websockets

from tests.realtime.conftest import Client, Server, start_server
from tests.realtime.test_faults import server_log

STUB = ("--engine", "stub", "--stub-ttft-ms", "0", "--stub-frame-ms", "2")


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> float | None:
    """Seconds until the server closed this socket (EOF or reset), None if it did not within ``within``."""
    t0 = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(4096), within - (time.monotonic() - t0)):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


async def healthz(srv: Server, timeout: float = 2.0) -> int | None:
    try:
        async with httpx.AsyncClient(base_url=srv.http, timeout=timeout) as http:
            return (await http.get("/healthz")).status_code
    except httpx.HTTPError:
        return None


async def test_silent_and_drip_fed_sockets_are_closed_within_the_handshake_timeout(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", *STUB, "--limit", "handshake_timeout_s=1")
    try:
        silent = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(300)]
        drip = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(30)]

        async def drip_feed(writer: asyncio.StreamWriter) -> None:
            writer.write(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n")
            for i in range(50):  # a header line every 0.2 s: the head is never complete
                await asyncio.sleep(0.2)
                writer.write(f"X-Drip-{i}: y\r\n".encode())
                await writer.drain()

        feeders = [asyncio.create_task(drip_feed(w)) for _, w in drip]
        waits = await asyncio.gather(*(closed_by_server(r, 5.0) for r, _ in silent + drip))
        for task in feeders:
            task.cancel()
        await asyncio.gather(*feeders, return_exceptions=True)
        open_still = sum(w is None for w in waits)
        print(f"\n300 silent + 30 drip-fed sockets: all closed after {max(w or 99 for w in waits):.2f} s "
              f"(handshake timeout 1 s); {open_still} still open")
        assert open_still == 0 and max(w for w in waits if w is not None) < 3.0
        for _, w in silent + drip:
            w.close()
        assert await healthz(srv) == 200
        client = await Client.connect(srv.url)
        await client.start()  # a WebSocket that finished its handshake is not cut at the handshake timeout
        await asyncio.sleep(1.5)
        await client.ping()
        await client.close()
    finally:
        srv.stop()


async def test_out_of_file_descriptors_backs_off_and_recovers(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", *STUB, "--limit", "handshake_timeout_s=2", fd_limit=200)
    try:
        server = psutil.Process(srv.proc.pid)
        before = len(server_log(srv))
        flood = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(250)]
        server.cpu_percent()
        await asyncio.sleep(3.0)
        cpu = server.cpu_percent()  # out of fds for most of these 3 s
        for _, w in flood:
            w.close()
        t0 = time.monotonic()
        while (code := await healthz(srv, 1.0)) != 200 and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.2)
        back = time.monotonic() - t0
        log = server_log(srv)[before:]
        print(f"\n250 silent sockets at a 200-fd limit: server CPU {cpu:.0f} % during the flood; /healthz {code} "
              f"{back:.1f} s after it ended; {len(log)} bytes of log "
              f"({log.count('out of system resource')} lines about it)")
        assert code == 200 and back < 5.0
        assert cpu < 50  # backing off, not spinning on accept
        assert len(log) < 20_000  # was 59 MB in 25 s
        client = await Client.connect(srv.url)
        await client.start()
        await client.close()
    finally:
        srv.stop()


async def test_a_reconnect_storm_of_invalid_utf8_logs_a_line_a_second(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", *STUB)
    try:
        before = len(server_log(srv))
        storms, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 3.0:
            async with websockets.connect(srv.url) as ws:
                await ws.send(b"\xff\xfe", text=True)
                try:
                    await asyncio.wait_for(ws.recv(), 2)
                except (websockets.ConnectionClosed, TimeoutError):
                    pass
            storms += 1
        await asyncio.sleep(0.2)
        log = server_log(srv)[before:]
        lines = [ln for ln in log.splitlines() if "Invalid UTF-8" in ln]
        print(f"\n{storms} connections with invalid UTF-8 in 3 s: {len(lines)} log lines, {len(log)} bytes")
        assert storms > 50 and len(lines) <= 5 and len(log) < 5_000  # was 342 tracebacks a second
        assert any("more like this" in ln for ln in lines)
        assert await healthz(srv) == 200
    finally:
        srv.stop()
