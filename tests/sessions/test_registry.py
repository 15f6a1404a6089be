"""The engine-worker registry against a real Redis: heartbeat, expiry, deregistration, and a real `shoal worker`
process registering itself and leaving cleanly (SIGTERM) or by expiry (kill -9)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sessions.embedded import EmbeddedRedis
from sessions.store import StoreError
from sessions.registry import WorkerRecord, WorkerRegistry, decode_record, encode_record


@pytest.fixture
async def registry(redis_server: str) -> AsyncIterator[WorkerRegistry]:
    async with WorkerRegistry(redis_server, key_prefix=f"test-{uuid.uuid4().hex[:12]}", ttl_ms=400) as r:
        yield r


def record(worker_id: str, port: int = 9000, **fields: object) -> WorkerRecord:
    return WorkerRecord(id=worker_id, host="127.0.0.1", port=port, **fields)  # type: ignore[arg-type]


async def test_heartbeat_lists_a_worker_with_its_record(registry: WorkerRegistry) -> None:
    assert await registry.live() == []
    before = time.time()
    await registry.heartbeat(record("w0", 9001, pid=42, engine={"name": "stub", "sample_rate": 44100}, load=3,
                                    stats={"worker_requests_total": 7, "hits": 0.5}, started_at=before))
    await registry.heartbeat(record("w1", 9002, health="not started"))
    live = await registry.live()
    assert [(w.id, w.port) for w in live] == [("w0", 9001), ("w1", 9002)]
    w0 = live[0]
    assert (w0.pid, w0.load, w0.health, w0.engine["name"]) == (42, 3, None, "stub")
    assert w0.stats == {"worker_requests_total": 7.0, "hits": 0.5}
    assert w0.updated_at >= before and live[1].health == "not started"


async def test_a_worker_that_stops_heartbeating_expires(registry: WorkerRegistry, redis_server: str) -> None:
    await registry.heartbeat(record("gone"))
    await registry.heartbeat(record("kept"))
    for _ in range(8):  # 0.8 s: twice the TTL; "kept" keeps beating, "gone" does not
        await asyncio.sleep(0.1)
        await registry.heartbeat(record("kept"))
    assert [w.id for w in await registry.live()] == ["kept"]
    raw = aioredis.Redis.from_url(redis_server)
    try:  # the expired id was pruned from the index, not only hidden
        assert await raw.zrange(registry.index_key, 0, -1) == [b"kept"]
        assert 0 < await raw.pttl(registry.worker_key("kept")) <= 400
    finally:
        await raw.aclose()


async def test_deregister_removes_at_once(registry: WorkerRegistry) -> None:
    await registry.heartbeat(record("w0"))
    await registry.heartbeat(record("w1"))
    assert await registry.deregister("w0") is True
    assert await registry.deregister("w0") is False
    assert [w.id for w in await registry.live()] == ["w1"]


async def test_a_restarted_worker_replaces_its_record(registry: WorkerRegistry) -> None:
    await registry.heartbeat(record("w0", 9001, pid=1))
    await registry.heartbeat(record("w0", 9005, pid=2))
    assert [(w.id, w.port, w.pid) for w in await registry.live()] == [("w0", 9005, 2)]


async def test_pools_are_separate(redis_server: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    async with WorkerRegistry(redis_server, key_prefix=prefix, pool="a") as a, \
            WorkerRegistry(redis_server, key_prefix=prefix, pool="b") as b:
        await a.heartbeat(record("w0"))
        assert [w.id for w in await a.live()] == ["w0"] and await b.live() == []
        assert a.index_key != b.index_key and "{a}" in a.index_key and "{a}" in a.worker_key("w0")


def test_records_and_names_are_validated() -> None:
    rec = record("w-0.x", 1234, stats={"a": 1})
    assert decode_record(encode_record(rec)) == rec
    for bad in ("", "has space", "x" * 200):
        with pytest.raises(ValueError):
            record(bad)
    with pytest.raises(ValueError):
        record("w0", 0)
    with pytest.raises(ValueError):
        WorkerRegistry("redis://localhost", pool="no spaces")
    with pytest.raises(StoreError):
        decode_record(b"\x93\x01\x02\x03")


async def test_redis_failures_are_store_errors(tmp_path: Path) -> None:
    registry = WorkerRegistry(f"unix://{tmp_path}/nothing.sock", socket_timeout_s=0.5)
    with pytest.raises(StoreError):
        await registry.connect()
    with pytest.raises(RuntimeError, match="not connected"):
        await registry.live()


# --------------------------------------------------------------------------------------- a real worker process

READY = re.compile(r"shoal worker: (\S+) listening on (\S+):(\d+)")


def start_worker(redis_url: str, pool: str, worker_id: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "realtime", "worker", "--engine", "stub", "--redis", redis_url, "--pool", pool,
           "--id", worker_id]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = READY.search(line)
    if not m:
        proc.kill()
        raise AssertionError(f"worker did not start: {line}{proc.stdout.read()}")
    assert m.group(1) == worker_id and "registered in pool" in line
    return proc, int(m.group(3))


async def test_a_worker_process_registers_beats_and_deregisters_on_sigterm(redis_server: str) -> None:
    pool = f"p{uuid.uuid4().hex[:8]}"
    proc, port = start_worker(redis_server, pool, "alpha")
    async with WorkerRegistry(redis_server, pool=pool) as registry:
        try:
            (w,) = await registry.live()  # registered before it said it was listening
            assert (w.id, w.port, w.pid, w.engine["name"], w.health) == ("alpha", port, proc.pid, "stub", None)
            first = w.updated_at
            await asyncio.sleep(1.5)
            (w,) = await registry.live()
            assert w.updated_at > first and "worker_requests_total" in w.stats  # heartbeats carry stats
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        assert await registry.live() == []  # gone at once, not after the TTL


async def test_a_killed_worker_expires_within_the_ttl(redis_server: str) -> None:
    pool = f"p{uuid.uuid4().hex[:8]}"
    proc, _ = start_worker(redis_server, pool, "beta")
    async with WorkerRegistry(redis_server, pool=pool) as registry:
        assert [w.id for w in await registry.live()] == ["beta"]
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        assert [w.id for w in await registry.live()] == ["beta"]  # nobody said goodbye
        while await registry.live():
            assert time.monotonic() - killed < 6.0, "the record outlived its TTL (4 s)"
            await asyncio.sleep(0.1)


def test_worker_registers_in_the_embedded_redis_of_a_data_dir(tmp_path: Path) -> None:
    """`shoal worker --data-dir DIR` finds the gateway's embedded Redis by its data dir."""
    with EmbeddedRedis(tmp_path / "data") as server:
        cmd = [sys.executable, "-m", "realtime", "worker", "--engine", "stub", "--data-dir", str(tmp_path / "data"),
               "--id", "gamma"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline()
            assert "gamma listening on" in line and "registered in pool default" in line, line

            async def ids() -> list[str]:
                async with WorkerRegistry(server.url) as registry:
                    return [w.id for w in await registry.live()]

            assert asyncio.run(ids()) == ["gamma"]
        finally:
            proc.terminate()
            proc.wait(10)


async def test_the_gateways_store_and_registry_share_one_connection_pool(redis_server: str) -> None:
    from sessions.store import SessionStore

    store = SessionStore(redis_server, key_prefix=f"test-{uuid.uuid4().hex[:12]}")
    shared = WorkerRegistry(store.redis, pool="gw", key_prefix=store.key_prefix)
    await store.connect()
    await shared.connect()
    assert shared.redis is store.redis and shared._client is store._client  # one client, one pool
    await shared.heartbeat(record("w0"))
    await shared.aclose()  # a guest: the pool stays open for the store
    await store.ping()
    assert [r.id for r in await WorkerRegistry(store.redis, pool="gw", key_prefix=store.key_prefix).live()] == ["w0"]
    await store.aclose()  # the owner closes it
    assert not store.redis.connected
