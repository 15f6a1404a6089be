"""Beyond one machine, on one: two gateways and two engine workers on one external Redis, end to end.

Two `shoal serve --redis URL --worker-pool P` on their own ports (what two machines behind a load balancer run) and
two `shoal worker --redis URL --pool P` (the stub engine: a fake with a GPU's cadence), all real processes, one real
Redis started by the test. A client that loses gateway A and reconnects to gateway B resumes its session there,
with every turn, and its next turn goes to the same worker as before (both gateways rank the workers alike for a
session id), so that worker's prefix cache would still be warm.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.pool import rendezvous_rank
from engine.rpc_client import WorkerClient, WorkerLost
from sessions.registry import WorkerRecord, WorkerRegistry
from sessions.store import SessionStore
from tests.realtime.conftest import Client, Server, start_server
from tests.realtime.test_e2e import speak

POOL = "topology"


def start_worker(redis_url: str, worker_id: str, timeout: float = 60.0) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "shoal", "worker", "--redis", redis_url, "--pool", POOL, "--id", worker_id,
           "--engine", "stub", "--prefix-cache", "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "listening on" in line:
            return proc
    proc.kill()
    raise AssertionError("shoal worker did not start:\n" + "".join(seen))


@pytest.fixture
def topology(tmp_path: Path, redis_server: str) -> Iterator[tuple[Server, Server]]:
    workers = [start_worker(redis_server, f"engine-{i}") for i in range(2)]
    gateways: list[Server] = []
    try:
        for name in ("a", "b"):
            gateways.append(start_server(tmp_path / name, "--redis", redis_server, "--worker-pool", POOL, timeout=60))
        yield gateways[0], gateways[1]
    finally:
        for gateway in gateways:
            if gateway.proc.poll() is None:
                assert gateway.stop() == 0
        for worker in workers:
            worker.terminate()
            worker.wait(15)


async def live_workers(redis_url: str) -> list[WorkerRecord]:
    async with WorkerRegistry(redis_url, pool=POOL) as registry:
        return await registry.live()


async def served(redis_url: str) -> dict[str, int]:
    """Requests taken so far by each worker (by id), asked over the worker RPC."""
    out = {}
    for w in await live_workers(redis_url):
        try:
            client = await WorkerClient.connect(w.host, w.port)
        except WorkerLost:
            continue
        out[w.id] = int((await client.stats()).stats["worker_requests_total"])
        await client.aclose()
    return out


async def test_a_client_moves_to_the_other_gateway_and_keeps_its_session_and_its_worker(
        topology: tuple[Server, Server], redis_server: str) -> None:
    a, b = topology
    for gateway in (a, b):
        health = httpx.get(f"{gateway.http}/healthz").json()
        assert health["status"] == "ok" and sorted(w["id"] for w in health["workers"]) == ["engine-0", "engine-1"]
    ids = [w.id for w in await live_workers(redis_server)]
    sessions = ["road-trip", "ferry", "night-train", "bicycle"]
    homes = {s: rendezvous_rank(s, ids)[0] for s in sessions}
    assert set(homes.values()) == set(ids), "these session ids should cover both workers"

    for session in sessions:
        first = await Client.connect(a.url)
        assert (await first.start(session=session))["resumed"] is False
        for turn in range(2):
            before = await served(redis_server)
            done, _ = await speak(first, [f"Turn {turn} on gateway A."], turn % 2)
            assert done["turn"] == turn and done["reason"] == "complete"
            after = await served(redis_server)
            assert {w: after[w] - before[w] for w in after if after[w] != before[w]} == {homes[session]: 1}
        await first.close()  # gateway A is lost to this client (a dropped connection, a dead machine)

        moved = await Client.connect(b.url)
        ready = await moved.start(session=session)
        assert ready["resumed"] is True and ready["turns"] == 2
        before = await served(redis_server)
        done, _ = await speak(moved, ["And now from gateway B."], 0)
        assert done["turn"] == 2 and done["reason"] == "complete"
        after = await served(redis_server)
        assert {w: after[w] - before[w] for w in after if after[w] != before[w]} == {homes[session]: 1}, session
        await moved.close()

        async with SessionStore(redis_server) as store:
            turns = await store.load_turns(session)
        assert [t.index for t in turns] == [0, 1, 2] and turns[2].text == "And now from gateway B."
