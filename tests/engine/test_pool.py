"""``PoolEngine``: rendezvous routing, stickiness through real worker processes, and failover when a worker is killed
(before its first chunk: invisible; mid-turn: one error, then the next worker). The Synthesizer contract through a
pool is run by ``test_contract.py``."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from engine.base import AudioChunk, EngineError, SynthesisRequest
from engine.pool import PoolConfig, PoolEngine, PoolMember, StaticMembers, rendezvous_rank
from engine.rpc_client import WorkerClient
from engine.stub import StubConfig, StubSynthesizer
from engine.rpc_server import WorkerConfig, WorkerServer
from tests.engine.stub_workers import Worker, running

LONG = " ".join(f"This is sentence number {i} of a long and winding reply." for i in range(40))
FAST = PoolConfig(refresh_s=0.2, start_timeout_s=5, connect_timeout_s=2, down_s=5)


# ------------------------------------------------------------------------------------------ rendezvous hashing

IDS = [f"w{i}" for i in range(4)]
KEYS = [f"session-{i}" for i in range(4000)]


def test_rendezvous_is_a_pure_function_of_key_and_set() -> None:
    assert rendezvous_rank("abc", IDS) == rendezvous_rank("abc", reversed(IDS)) == rendezvous_rank("abc", IDS + IDS)
    assert sorted(rendezvous_rank("abc", IDS)) == IDS
    code = "import json, sys; from engine.pool import rendezvous_rank as r; print(json.dumps([r(k, %r) for k in %r]))"
    other = subprocess.run([sys.executable, "-c", code % (IDS, KEYS[:50])], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"}, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert json.loads(other.stdout) == [rendezvous_rank(k, IDS) for k in KEYS[:50]]  # same in another process


def test_rendezvous_spreads_keys_evenly() -> None:
    first = Counter(rendezvous_rank(k, IDS)[0] for k in KEYS)
    assert set(first) == set(IDS)
    assert all(0.21 < n / len(KEYS) < 0.29 for n in first.values()), first


def test_rendezvous_moves_only_the_keys_of_a_worker_that_leaves() -> None:
    before = {k: rendezvous_rank(k, IDS)[0] for k in KEYS}
    after = {k: rendezvous_rank(k, [i for i in IDS if i != "w2"])[0] for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == "w2" for k in moved) and len(moved) == sum(v == "w2" for v in before.values())
    assert all(after[k] == rendezvous_rank(k, IDS)[1] for k in moved)  # each to its second choice ...
    assert len(set(after[k] for k in moved)) == 3  # ... which spreads them over the rest


def test_rendezvous_moves_only_keys_to_a_worker_that_joins() -> None:
    before = {k: rendezvous_rank(k, IDS)[0] for k in KEYS}
    after = {k: rendezvous_rank(k, IDS + ["w9"])[0] for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(after[k] == "w9" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # about a fifth


# ---------------------------------------------------------------------------------------- real worker processes


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    with running(["w0", "w1"]) as ws:
        yield ws


@pytest.fixture
async def pool(workers: list[Worker]) -> AsyncIterator[PoolEngine]:
    engine = PoolEngine(StaticMembers(w.member for w in workers), FAST)
    await engine.start()
    yield engine
    await engine.aclose()


async def served(workers: list[Worker]) -> dict[str, int]:
    """Requests each live worker has taken, asked over the RPC."""
    out = {}
    for w in workers:
        if w.proc.poll() is None:
            client = await WorkerClient.connect("127.0.0.1", w.port)
            out[w.id] = int((await client.stats()).stats["worker_requests_total"])
            await client.aclose()
    return out


async def say(pool: PoolEngine, text: str, session: str | None) -> list[AudioChunk]:
    async with asyncio.timeout(20):
        return [c async for c in pool.synthesize(SynthesisRequest(text, session=session))]


async def test_pool_audio_equals_what_a_worker_makes(pool: PoolEngine, workers: list[Worker]) -> None:
    request = SynthesisRequest("Same audio, wherever it is made.", speaker=3, session="x")
    got = [c async for c in pool.synthesize(request)]
    other = next(w for w in workers if w.id != pool.route("x").id)  # the same request, straight to the other one
    direct = await WorkerClient.connect("127.0.0.1", other.port)
    want = [c async for c in direct.synthesize(request)]
    await direct.aclose()
    assert pool.info == StubSynthesizer().info and len(got) == len(want) > 20
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in got]), np.concatenate([c.pcm for c in want]))
    np.testing.assert_array_equal(np.concatenate([c.codes for c in got], 1), np.concatenate([c.codes for c in want], 1))


async def test_unstarted_pool_is_unhealthy_and_refuses_requests(workers: list[Worker]) -> None:
    pool = PoolEngine(StaticMembers(w.member for w in workers), FAST)
    assert pool.health() == "not started"
    with pytest.raises(EngineError, match="not started"):
        await say(pool, "Hello.", "s")
    await pool.aclose()


async def test_sessions_stick_to_their_rendezvous_worker_and_spread(pool: PoolEngine, workers: list[Worker]) -> None:
    counts = await served(workers)
    used = Counter()
    for i in range(10):
        session = f"conversation-{i}"
        expected = rendezvous_rank(session, ["w0", "w1"])[0]
        assert pool.route(session).id == expected
        for turn in range(3):
            await say(pool, f"Turn {turn} of session {i}.", session)
            now = await served(workers)
            delta = {k: now[k] - counts[k] for k in now}
            assert delta == {w: int(w == expected) for w in now}, (session, turn, delta)  # sticky
            counts = now
        used[expected] += 1
    assert set(used) == {"w0", "w1"}  # spread
    assert pool.stats()["pool_requests_total"] == 30 and pool.stats()["pool_failovers_total"] == 0


async def test_a_dead_worker_is_passed_over_before_the_first_chunk(pool: PoolEngine, workers: list[Worker]) -> None:
    session = next(f"s{i}" for i in range(100) if pool.route(f"s{i}").id == "w0")
    await say(pool, "Warm up on w0.", session)
    workers[0].kill()
    chunks = await say(pool, "Nobody notices the failover.", session)  # w0 is refused: w1 takes it
    assert sum(c.pcm.size for c in chunks) > 0
    assert (await served(workers)) == {"w1": 1}
    assert pool.stats()["pool_failovers_total"] == 1
    await say(pool, "And stays there.", session)  # w0 is passed over: no second failover
    assert pool.stats()["pool_failovers_total"] == 1 and (await served(workers)) == {"w1": 2}


async def test_a_worker_killed_mid_turn_fails_that_turn_and_the_next_goes_elsewhere(
    pool: PoolEngine, workers: list[Worker]
) -> None:
    session = next(f"s{i}" for i in range(100) if pool.route(f"s{i}").id == "w1")
    stream = pool.synthesize(SynthesisRequest(LONG, session=session))
    for _ in range(3):
        await anext(stream)
    workers[1].kill()
    with pytest.raises(EngineError, match="the next turn goes to another worker"):
        async with asyncio.timeout(5):
            async for _ in stream:
                pass
    assert pool.stats()["pool_lost_mid_turn_total"] == 1
    chunks = await say(pool, "The conversation goes on.", session)
    assert len(chunks) > 5 and (await served(workers)) == {"w0": 1}


async def test_sigterm_lets_a_worker_finish_its_turn_and_new_ones_go_elsewhere(
    pool: PoolEngine, workers: list[Worker]
) -> None:
    session = next(f"s{i}" for i in range(100) if pool.route(f"s{i}").id == "w0")
    probe = await WorkerClient.connect("127.0.0.1", workers[0].port)
    stream = pool.synthesize(SynthesisRequest("A sentence that is allowed to finish after the signal.", session=session))
    chunks = [await anext(stream)]  # and then it waits for us: w0 cannot finish it before we read on
    workers[0].proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        while (await probe.stats()).health != "shutting down":
            await asyncio.sleep(0.02)
    later = await say(pool, "This one goes to the other worker.", session)  # w0 refuses it: unseen failover
    async for chunk in stream:
        chunks.append(chunk)
    assert len(chunks) > 20 and len(later) > 5  # the draining turn ran to its end
    assert workers[0].proc.wait(10) == 0
    assert (await served(workers)) == {"w1": 1} and pool.stats()["pool_failovers_total"] == 1
    await probe.aclose()


async def test_no_live_worker_is_a_clear_engine_error(workers: list[Worker]) -> None:
    with pytest.raises(EngineError, match="no live engine worker within"):
        await PoolEngine(StaticMembers([]), PoolConfig(start_timeout_s=0.3)).start()
    pool = PoolEngine(StaticMembers(w.member for w in workers), FAST)
    await pool.start()
    for w in workers:
        w.kill()
    with pytest.raises(EngineError, match="no engine worker could take the request"):
        await say(pool, "Anyone?", "s")
    assert pool.stats()["pool_unavailable_total"] == 1
    pool.source.list = []  # type: ignore[attr-defined]  # the registry forgets them
    await asyncio.sleep(0.5)
    assert pool.health() is not None and "no live engine worker" in pool.health()
    with pytest.raises(EngineError, match="no live engine worker"):
        await say(pool, "Anyone?", "s")
    await pool.aclose()


async def test_stats_sum_the_workers_and_count_the_pool() -> None:
    members = [
        PoolMember("a", "127.0.0.1", 1, stats={"prefix_hits_total": 3, "bytes_held": 100}),
        PoolMember("b", "127.0.0.1", 2, stats={"prefix_hits_total": 4}),
        PoolMember("c", "127.0.0.1", 3, health="not started", stats={"bytes_held": 1}),
    ]
    pool = PoolEngine(StaticMembers(members))
    await pool._refresh()
    stats = pool.stats()
    assert stats["prefix_hits_total"] == 7 and stats["bytes_held"] == 101
    assert stats["pool_workers"] == 2 and stats["pool_workers_registered"] == 3  # an unhealthy one is not routed to
    assert pool.route("anything").id in ("a", "b")


async def test_a_worker_with_another_sample_rate_is_not_used() -> None:
    servers = []
    for rate in (44100, 24000):
        engine = StubSynthesizer(StubConfig(ttft_ms=0, frame_ms=0, sample_rate=rate))
        await engine.start()
        server = WorkerServer(engine, WorkerConfig(worker_id=f"r{rate}"))
        servers.append((server, (await server.start("127.0.0.1", 0))[1]))
    good, odd = (PoolMember(s.config.worker_id, "127.0.0.1", port) for s, port in servers)
    pool = PoolEngine(StaticMembers([good]), FAST)
    await pool.start()
    pool.source.list = [good, odd]  # type: ignore[attr-defined]
    await pool._refresh()
    session = next(f"s{i}" for i in range(100) if pool.route(f"s{i}").id == "r24000")
    chunks = await say(pool, "Only the 44.1 kHz worker speaks.", session)
    assert chunks and all(c.pcm.size == 2048 for c in chunks)
    assert servers[1][0].counters.requests == 0 and pool.stats()["pool_failovers_total"] == 1
    await pool.aclose()
    for server, _ in servers:
        await server.stop(0)


class SwallowingSource(StaticMembers):
    """A source that, like redis-py's asyncio client on Python 3.11 (asyncio.wait_for around each send), loses a
    cancel that arrives while it reads."""

    async def members(self):  # type: ignore[override]
        try:
            await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            pass
        return list(self.list)


async def test_aclose_does_not_depend_on_the_source_honouring_cancellation(workers: list[Worker]) -> None:
    for _ in range(20):
        pool = PoolEngine(SwallowingSource(w.member for w in workers), PoolConfig(refresh_s=0.001))
        await pool.start()
        await asyncio.sleep(0.01)
        async with asyncio.timeout(2):
            await pool.aclose()
        assert pool._refresher is not None and pool._refresher.done()


async def test_worker_counters_never_go_backwards_when_a_worker_restarts_or_leaves() -> None:
    source = StaticMembers([PoolMember("a", "127.0.0.1", 1, stats={"worker_requests_total": 5, "load_now": 2}),
                            PoolMember("b", "127.0.0.1", 2, stats={"worker_requests_total": 3})])
    pool = PoolEngine(source)
    seen = []

    async def refresh(*members: PoolMember) -> None:
        source.list = list(members)
        await pool._refresh()
        seen.append(pool.stats()["worker_requests_total"])

    a, b = source.list
    await refresh(a, b)
    await refresh(PoolMember("a", "127.0.0.1", 1, stats={"worker_requests_total": 1}), b)  # a restarted in place
    await refresh(b)  # a died: gone from the registry
    await refresh(b, PoolMember("a", "127.0.0.1", 7, stats={"worker_requests_total": 2}, started_at=9.0))  # back
    await refresh(b, PoolMember("a", "127.0.0.1", 7, stats={"worker_requests_total": 4}, started_at=9.0))
    assert seen == [8, 9, 9, 11, 13]  # 5 + 3, then + 1 after the restart, + 2 and + 2 more after the next
    assert "load_now" not in pool.stats()  # gauges are the live workers' only: the a that reported it is gone
