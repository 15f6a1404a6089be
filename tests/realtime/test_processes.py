"""`shoal serve --processes 2` end to end: two real gateway processes on one port (SO_REUSEPORT), the embedded Redis,
real sockets, the stub engine in each (a fake with a GPU's cadence: what the test must control).

Sessions spread over both processes (the kernel's choice, seen from outside: which process holds each client's
socket); a session resumed through the other process keeps its turns; `/metrics`, whichever process answers, counts
the work of both; a gateway that dies is started again; SIGTERM drains every open session with a goodbye.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import websockets

from tests.realtime.conftest import Client, Server, start_server
from tests.realtime.test_e2e import speak

_PIDS = re.compile(r"(\d+) gateway processes \(pids ([\d, ]+)\)")


def gateway_pids(srv: Server) -> list[int]:
    m = next(m for line in srv.lines if (m := _PIDS.search(line)))
    return [int(p) for p in m.group(2).split(", ")]


def live_gateways(parent: int) -> list[int]:
    """The parent's gateway processes alive now (multiprocessing's spawned children, not its resource tracker)."""
    out = []
    for child in psutil.Process(parent).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                out.append(child.pid)
        except psutil.Error:
            continue  # gone while listed
    return out


def listening(pid: int, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except psutil.Error:
        return False


def owner(client: Client, pids: list[int]) -> int:
    """The gateway process holding this client's socket: the one with a connection from the client's port."""
    port = client.ws.local_address[1]
    for pid in pids:
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == port:
                return pid
    raise AssertionError(f"no gateway process holds the connection from port {port}")


def metric(text: str, line: str) -> float:
    m = re.search(rf"^{re.escape(line)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def output(srv: Server) -> str:
    """Everything the server printed, once it has exited."""
    assert srv.proc.stdout is not None and srv.proc.poll() is not None
    os.set_blocking(srv.proc.stdout.fileno(), True)
    srv.lines.append(srv.proc.stdout.read())
    return "".join(srv.lines)


def scrape(srv: Server) -> str:
    return httpx.get(f"{srv.http}/metrics", timeout=10).text


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data", "--engine", "stub", "--processes", "2", timeout=90)
    yield srv
    code = srv.stop()
    out = output(srv)
    assert code == 0 and "Traceback" not in out, out


async def test_sessions_spread_over_both_processes_and_metrics_count_them_all(two: Server) -> None:
    pids = gateway_pids(two)
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    clients = [await Client.connect(two.url) for _ in range(16)]
    for i, client in enumerate(clients):
        await client.start(session=f"spread-{i}")
    owners = [owner(c, pids) for c in clients]
    assert set(owners) == set(pids), f"16 connections all went to one process: {owners}"  # 2 * 2**-16 by chance

    text = scrape(two)
    assert metric(text, "shoal_sessions_open") == 16 and metric(text, "shoal_connections_open") == 16, text
    turns = await asyncio.gather(*(speak(c, [f"Hello from session {i}."], i % 2) for i, c in enumerate(clients)))
    assert all(done["reason"] == "complete" and done["frames"] > 0 for done, _ in turns)
    audio_ms = sum(done["audio_ms"] for done, _ in turns)

    # every scrape, whichever process answers it, sums the work of both
    for _ in range(4):
        text = scrape(two)
        assert metric(text, 'shoal_turns_total{reason="complete"}') == 16, text
        assert metric(text, "shoal_ttfa_seconds_count") == 16
        assert abs(metric(text, "shoal_audio_sent_seconds_total") * 1000 - audio_ms) <= 16 * 20  # frames rounded
    assert metric(text, "shoal_event_loop_tasks") > 4  # both loops' tasks, sampled every second

    for client in clients:
        await client.close()
    deadline = time.monotonic() + 10
    while metric(scrape(two), "shoal_sessions_open") or metric(scrape(two), "shoal_connections_open"):
        assert time.monotonic() < deadline, scrape(two)
        await asyncio.sleep(0.2)


async def test_a_session_resumed_through_the_other_process_keeps_its_turns(two: Server) -> None:
    pids = gateway_pids(two)
    first = await Client.connect(two.url)
    await first.start(session="moving-house")
    for turn in range(2):
        done, _ = await speak(first, [f"Turn {turn} of the move."], turn % 2)
        assert done["turn"] == turn and done["reason"] == "complete"
    home = owner(first, pids)
    await first.close()

    for _ in range(60):  # the kernel picks a process by the client's port: try until the other one answers
        again = await Client.connect(two.url)
        if owner(again, pids) != home:
            break
        await again.close()
    else:
        raise AssertionError("60 connections in a row went to the same process")
    ready = await again.start(session="moving-house")
    assert ready["resumed"] is True and ready["turns"] == 2
    done, _ = await speak(again, ["And the third turn, in the other process."], 0)
    assert done["turn"] == 2 and done["reason"] == "complete"
    await again.close()


async def test_a_gateway_that_dies_is_started_again_and_sigterm_drains_every_session(two: Server) -> None:
    pids = gateway_pids(two)
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        children = live_gateways(two.proc.pid)
        if pids[0] not in children and len(children) == 2 and all(listening(p, two.port) for p in children):
            break
        assert time.monotonic() < deadline, children
        await asyncio.sleep(0.2)
    clients = []
    for i in range(16):  # both processes take sessions again (the new one too)
        client = await Client.connect(two.url)
        await client.start(session=f"after-{i}")
        clients.append(client)
    assert len({owner(c, children) for c in clients}) == 2

    two.proc.send_signal(signal.SIGTERM)
    for client in clients:  # every open session is told, then closed with 1001 (going away)
        error, _ = await client.until("error", timeout=20)
        assert error["code"] == "internal" and "shutting down" in error["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await client.until("never", timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert two.proc.wait(30) == 0
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in children)
    out = output(two)
    assert f"gateway process 0 (pid {pids[0]}) exited with code -9; restarting it" in out, out


async def test_the_embedded_redis_killed_under_two_processes_is_restarted_and_counted_once(two: Server) -> None:
    client = await Client.connect(two.url)
    await client.start(session="through-the-outage")
    done, _ = await speak(client, ["Before the store goes."], 0)
    assert done["reason"] == "complete"
    assert metric(scrape(two), "shoal_store_restarts_total") == 0
    os.kill(int((two.data_dir / "redis.pid").read_text().strip()), signal.SIGKILL)
    deadline = time.monotonic() + 20  # the parent restarts it; the count reaches both processes' scrapes
    while metric(text := scrape(two), "shoal_store_restarts_total") != 1:
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.2)
    done, _ = await speak(client, ["And after it came back."], 1)
    assert done["turn"] == 1 and done["reason"] == "complete"
    await client.close()
    again = await Client.connect(two.url)
    ready = await again.start(session="through-the-outage")
    assert ready["resumed"] is True and ready["turns"] == 2
    await again.close()
    assert all(metric(scrape(two), "shoal_store_restarts_total") == 1 for _ in range(4))


def test_a_second_server_on_the_same_port_is_refused_not_merged(two: Server, tmp_path: Path) -> None:
    # SO_REUSEPORT would let a second server of the same user share the port, and the kernel split clients between
    # two unrelated servers: it must fail as a single process does, with a clear error
    import subprocess
    import sys

    for extra in (["--processes", "2"], []):
        proc = subprocess.run([sys.executable, "-m", "shoal", "serve", "--engine", "stub", "--port", str(two.port),
                               "--data-dir", str(tmp_path / "other"), *extra], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and str(two.port) in proc.stdout + proc.stderr, proc.stderr
