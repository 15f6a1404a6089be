"""`shoal serve --workers 2` end to end: real gateway, real worker processes, the embedded Redis, real sockets.

Sessions spread over the workers by rendezvous hashing and stick to theirs across turns; a worker killed with
SIGKILL mid-conversation costs the turn in flight (the client gets `error` + `turn.done` reason `error`) and
nothing else: the next turn completes on another worker, rebuilt from the history, and a resumed session shows
every turn. Once with the stub engine, once with the tiny S2 Pro fixture.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.pool import rendezvous_rank
from engine.rpc_client import WorkerClient, WorkerLost
from sessions.embedded import EmbeddedRedis
from sessions.store import SessionStore
from sessions.registry import WorkerRecord, WorkerRegistry
from tests.engine.dualar import FIXTURES, MODEL_DIR
from tests.realtime.conftest import Client, Server, start_server
from tests.realtime.test_e2e import speak

LONG = " ".join(f"This is sentence number {i} of a long and winding reply." for i in range(12))
_POOL = re.compile(r"local engine workers in pool (\S+) ")


class PoolServer:
    """A `shoal serve --workers N` process, its output read continuously, and views of its pool."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        assert srv.proc.stdout is not None
        os.set_blocking(srv.proc.stdout.fileno(), True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        m = next(m for line in srv.lines if (m := _POOL.search(line)))
        self.pool = m.group(1)
        self.redis_url = EmbeddedRedis(srv.data_dir).url

    def _read(self) -> None:
        assert self.srv.proc.stdout is not None
        for line in self.srv.proc.stdout:
            self.srv.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.srv.lines)

    async def workers(self) -> list[WorkerRecord]:
        async with WorkerRegistry(self.redis_url, pool=self.pool) as registry:
            return await registry.live()

    async def served(self) -> dict[int, int]:
        """Requests taken so far by each live worker process (by pid), asked over the worker RPC."""
        out = {}
        for w in await self.workers():
            try:
                client = await WorkerClient.connect(w.host, w.port)
            except WorkerLost:
                continue  # killed; its record has not expired yet
            out[w.pid] = int((await client.stats()).stats["worker_requests_total"])
            await client.aclose()
        return out

    async def turns(self, session: str) -> list:
        async with SessionStore(self.redis_url) as store:
            return await store.load_turns(session)

    def stop(self) -> None:
        assert self.srv.stop() == 0


def pool_server(tmp_path: Path, *args: str, timeout: float = 60) -> Iterator[PoolServer]:
    srv = start_server(tmp_path / "data", "--workers", "2", *args, timeout=timeout)
    server = PoolServer(srv)
    yield server
    server.stop()
    assert "Traceback" not in server.output, server.output


@pytest.fixture
def stub_pool(tmp_path: Path) -> Iterator[PoolServer]:
    yield from pool_server(tmp_path, "--engine", "stub", "--prefix-cache", "off")


def delta(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {pid: n - before.get(pid, 0) for pid, n in after.items() if n != before.get(pid, 0)}


async def check_spread_and_stickiness(server: PoolServer, sessions: list[str], turns: int, **start: object) -> None:
    workers = await server.workers()
    pid_of = {w.id: w.pid for w in workers}
    home = {s: pid_of[rendezvous_rank(s, pid_of)[0]] for s in sessions}
    assert set(home.values()) == set(pid_of.values()), "these session ids should cover both workers"
    for session in sessions:
        client = await Client.connect(server.srv.url)
        ready = await client.start(session=session, **start)
        assert ready["session"] == session and ready["turns"] == 0
        for turn in range(turns):
            before = await server.served()
            done, _ = await speak(client, [f"Turn {turn}, please."], turn % 2)
            assert done["reason"] in ("complete", "length") and done["frames"] > 0
            assert delta(before, await server.served()) == {home[session]: 1}, (session, turn)  # one segment, home
        await client.close()


async def kill_mid_conversation(server: PoolServer, session: str, long_turn: dict | None = None, **start: object) -> None:
    client = await Client.connect(server.srv.url)
    await client.start(session=session, **start)
    for turn in range(2):
        done, _ = await speak(client, [f"Warm turn {turn}."], 0)
        assert done["reason"] in ("complete", "length")
    workers = await server.workers()
    home = next(w for w in workers if w.id == rendezvous_rank(session, [w.id for w in workers])[0])

    if long_turn is not None:  # e.g. more frames for the long turn
        await client.send(type="session.update", sampling=long_turn)
        await client.until("session.ready")
    await client.send(type="text", text=LONG, speaker=1)
    await client.send(type="turn.end")
    for _ in range(5):
        await client.until("audio", timeout=60)
    os.kill(home.pid, signal.SIGKILL)
    error, before = await client.until("error", timeout=30)
    assert error["code"] == "engine_unavailable" and error["fatal"] is False and "turn 2" in error["message"]
    done, _ = await client.until("turn.done", timeout=30)
    assert done["turn"] == 2 and done["reason"] == "error" and done["frames"] >= 5

    if long_turn is not None:
        await client.send(type="session.update", sampling=start.get("sampling", {}))
        await client.until("session.ready")
    served = await server.served()
    assert home.pid not in served
    done, msgs = await speak(client, ["Are you still there?"], 0)  # the next turn: another worker, full history
    assert done["turn"] == 3 and done["reason"] in ("complete", "length") and done["frames"] > 0
    assert not [m for m in msgs if m["type"] == "error"]
    assert sum(delta(served, await server.served()).values()) == 1
    await client.close()

    again = await Client.connect(server.srv.url)
    ready = await again.start(session=session)
    assert ready["resumed"] is True and ready["turns"] == 4  # every turn is there, the failed one included
    done, _ = await speak(again, ["One more."], 1)
    assert done["turn"] == 4 and done["reason"] in ("complete", "length")
    await again.close()

    turns = await server.turns(session)
    assert [t.index for t in turns] == [0, 1, 2, 3, 4]
    assert [t.state == "error" for t in turns] == [False, False, True, False, False]
    heard = turns[2].text  # the words that had started when the worker died (the stub's timing is exact)
    assert heard.startswith("This") and LONG.startswith(heard) and turns[2].audio_ms >= 100
    assert all(t.codes is not None and t.codes.shape[0] == 10 and t.codes.shape[1] > 0 for t in turns)

    metrics = httpx.get(f"{server.srv.http}/metrics").text
    assert "shoal_engine_pool_lost_mid_turn_total 1.0" in metrics
    assert 'shoal_turns_total{reason="error"} 1.0' in metrics


async def test_stub_sessions_spread_over_two_workers_and_stick_across_turns(stub_pool: PoolServer) -> None:
    health = httpx.get(f"{stub_pool.srv.http}/healthz").json()
    assert health["status"] == "ok" and health["engine"] == "stub"
    assert sorted(w["id"] for w in health["workers"]) == ["w0", "w1"]
    workers = await stub_pool.workers()
    assert sorted(w.id for w in workers) == ["w0", "w1"] and all(w.health is None for w in workers)
    for w in workers:  # configuration reached the workers on their command line
        cmdline = Path(f"/proc/{w.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--prefix-cache" in cmdline and cmdline[cmdline.index(b"--prefix-cache") + 1] == b"off"
    await check_spread_and_stickiness(stub_pool, [f"conversation-{i}" for i in range(6)], turns=3)
    metrics = httpx.get(f"{stub_pool.srv.http}/metrics").text
    assert "shoal_engine_pool_workers 2.0" in metrics
    deadline = time.monotonic() + 5
    while "shoal_engine_worker_requests_total 18.0" not in metrics:  # the summed worker stats catch up
        assert time.monotonic() < deadline, metrics
        await asyncio.sleep(0.3)
        metrics = httpx.get(f"{stub_pool.srv.http}/metrics").text


async def test_stub_worker_killed_mid_conversation_loses_only_the_turn_in_flight(stub_pool: PoolServer) -> None:
    await kill_mid_conversation(stub_pool, "the-story")
    assert "exited with code -9; restarting it" in stub_pool.output
    deadline = time.monotonic() + 15  # the supervisor brings the pool back to two workers
    while len(await stub_pool.workers()) < 2 or not all(w.health is None for w in await stub_pool.workers()):
        assert time.monotonic() < deadline, stub_pool.output
        await asyncio.sleep(0.2)
    workers = await stub_pool.workers()
    assert sorted(w.id for w in workers) == ["w0", "w1"]
    health = httpx.get(f"{stub_pool.srv.http}/healthz").json()
    assert health["status"] == "ok"


async def test_sigterm_stops_the_workers_with_the_gateway(tmp_path: Path) -> None:
    server = PoolServer(start_server(tmp_path / "data", "--workers", "2", "--engine", "stub"))
    pids = [w.pid for w in await server.workers()]
    assert len(pids) == 2
    server.stop()
    for pid in pids:  # stopped and reaped by the gateway, not left behind
        assert not Path(f"/proc/{pid}").exists()
    assert "Traceback" not in server.output


async def test_workers_of_a_killed_gateway_deregister_and_exit(tmp_path: Path) -> None:
    server = PoolServer(start_server(tmp_path / "data", "--workers", "2", "--engine", "stub"))
    workers = await server.workers()
    assert len(workers) == 2
    server.srv.proc.kill()  # no goodbye from the gateway: the workers notice their parent is gone
    server.srv.proc.wait()
    try:
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w.pid}").exists() for w in workers):
            assert time.monotonic() < deadline, "workers outlived their gateway"
            await asyncio.sleep(0.1)
        assert await server.workers() == []  # deregistered on the way out, not left to expire
    finally:
        redis = EmbeddedRedis(server.srv.data_dir)  # it survives the gateway by design: adopt and stop it
        redis.start()
        redis.stop()


def test_a_worker_that_cannot_start_fails_serve_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "realtime", "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
           "--workers", "2", "--model", str(tmp_path / "missing"), "--codec", str(tmp_path / "none.pth")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "engine worker w" in run.stderr and "exited with code 2" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------------------------------- the tiny S2 Pro fixture

SAMPLING = {"temperature": 0.7, "seed": 3, "max_frames": 8}


@pytest.fixture
def s2_pool(tmp_path: Path) -> Iterator[PoolServer]:
    yield from pool_server(tmp_path, "--model", str(MODEL_DIR), "--codec", str(FIXTURES / "codec" / "codec.pth"),
                           timeout=240)


async def test_s2pro_pool_spreads_sticks_and_survives_a_killed_worker(s2_pool: PoolServer) -> None:
    health = httpx.get(f"{s2_pool.srv.http}/healthz").json()
    assert health["status"] == "ok" and health["engine"] == "s2pro" and len(health["workers"]) == 2
    await check_spread_and_stickiness(s2_pool, [f"conversation-{i}" for i in range(6)], turns=2, sampling=SAMPLING)
    # voice.create goes to a worker's codec; the codes come back over the RPC
    client = await Client.connect(s2_pool.srv.url)
    await client.start(sampling=SAMPLING)
    rate = 44100
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 180 * np.arange(2 * rate) / rate) * 32767).astype("<i2").tobytes())
    await client.send(type="voice.create", voice="ref", audio=buf.getvalue(), text="A steady tone.")
    created, _ = await client.until("voice.created", timeout=60)
    assert created["frames"] == int(np.ceil(2 * rate / 2048))
    await client.close()
    await kill_mid_conversation(s2_pool, "the-story", long_turn={**SAMPLING, "max_frames": 600}, sampling=SAMPLING)


async def test_a_gateway_routes_to_workers_started_elsewhere(tmp_path: Path) -> None:
    """`shoal worker --redis URL --pool NAME` on its own, `shoal serve --redis URL --worker-pool NAME` using it; once
    the worker has stopped, turns get a clear `engine_unavailable` and /healthz says why."""
    import subprocess
    import sys

    with EmbeddedRedis(tmp_path / "redis") as redis:
        cmd = [sys.executable, "-m", "realtime", "worker", "--engine", "stub", "--redis", redis.url, "--pool", "ext",
               "--id", "remote-1"]
        worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert worker.stdout is not None and "remote-1 listening on" in worker.stdout.readline()
        srv = start_server(tmp_path / "data", "--redis", redis.url, "--worker-pool", "ext", "--engine", "stub")
        try:
            assert any("engine workers of pool ext" in line for line in srv.lines)
            health = httpx.get(f"{srv.http}/healthz").json()
            assert [w["id"] for w in health["workers"]] == ["remote-1"]
            client = await Client.connect(srv.url)
            await client.start()
            done, _ = await speak(client, ["Served from afar."], 0)
            assert done["reason"] == "complete" and done["frames"] > 0

            worker.terminate()  # the only worker leaves (and deregisters): the gateway has nowhere to go
            try:
                code = worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                raise AssertionError(f"worker did not stop: {worker.communicate()[0]}") from None
            assert code == 0
            done, msgs = await speak(client, ["Is anyone there?"], 0)
            errors = [m for m in msgs if m["type"] == "error"]
            assert done["reason"] == "error" and done["frames"] == 0
            assert [e["code"] for e in errors] == ["engine_unavailable"] and "engine worker" in errors[0]["message"]
            await client.ping()  # the session itself is fine
            await client.close()
            deadline = time.monotonic() + 5
            while (r := httpx.get(f"{srv.http}/healthz")).status_code != 503:
                assert time.monotonic() < deadline, r.text
                await asyncio.sleep(0.1)
            assert "no live engine worker" in r.json()["engine"] and r.json()["workers"] == []
        finally:
            if worker.poll() is None:
                worker.kill()
            assert srv.stop() == 0
