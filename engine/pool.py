"""A pool of engine workers behind the ``Synthesizer`` interface: what the gateway uses with ``--workers``.

    pool = PoolEngine(members)           # members: anything with ``async members() -> [PoolMember]``
    await pool.start()                   # waits for a first live worker, learns its EngineInfo
    async for chunk in pool.synthesize(request): ...

Routing. Each request goes to the worker that ranks first for ``request.session`` by rendezvous (highest random
weight) hashing over the live workers, so a session sticks to one worker while it lives and its prefix cache
stays warm; when a worker leaves, only its own sessions move (each to its next-ranked worker), and when one
joins, only the sessions it now ranks first for move to it. Requests without a session spread at random.

Failover. Workers come from ``members()`` (the registry in Redis, re-read every ``refresh_s``; the engine never
sees Redis: the source is injected). A worker that refuses a connection, drops it, or answers ``unavailable``
before the first chunk is skipped for ``down_s`` and the request goes to the next worker in its ranking — the
caller notices nothing. Once audio has been yielded, a lost worker ends the stream with ``EngineError`` (the
gateway reports that turn as an error); the next turn goes to another worker, which rebuilds the prefix from the
request, since every request carries the full history with its codes. No live worker: ``EngineError``.

Each worker has one multiplexed connection (``engine.rpc_client.WorkerClient``), opened on first use, pinged while
open, and reopened after a failure. Flow control is the RPC's credit window: at most ``window`` chunks wait per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.base import AudioChunk, EngineError, EngineInfo, SynthesisRequest
from engine.rpc_client import ClientConfig, WorkerClient, WorkerLost, WorkerUnavailable

__all__ = [
    "MemberSource",
    "PoolConfig",
    "PoolEngine",
    "PoolMember",
    "StaticMembers",
    "WorkerTotals",
    "rendezvous_rank",
]

log = logging.getLogger("shoal.pool")


@dataclass(frozen=True)
class PoolMember:
    """A live worker as the pool sees it (from the registry's heartbeat)."""

    id: str
    host: str
    port: int
    load: int = 0  # requests in flight
    health: str | None = None  # None when ready
    stats: Mapping[str, float] = field(default_factory=dict)
    started_at: float = 0.0  # when this process started (a restarted worker is a new instance)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class MemberSource(Protocol):
    async def members(self) -> Sequence[PoolMember]:
        """The workers alive now. Raises on failure (the pool keeps its last list)."""

    async def aclose(self) -> None:
        """Release connections (called by ``PoolEngine.aclose``)."""


class StaticMembers:
    """A fixed list of workers: for tests and pools without a registry."""

    def __init__(self, members: Iterable[PoolMember]) -> None:
        self.list = list(members)

    async def members(self) -> Sequence[PoolMember]:
        return list(self.list)

    async def aclose(self) -> None:
        pass


def _weight(key: str, member: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_rank(key: str, ids: Iterable[str]) -> list[str]:
    """Worker ids best-first for ``key``: a pure function of the key and the set of ids (stable across processes)."""
    return sorted(set(ids), key=lambda m: (_weight(key, m), m), reverse=True)


@dataclass(frozen=True)
class PoolConfig(ClientConfig):
    """The pool's settings, and (inherited) those of its connections to the workers."""

    refresh_s: float = 1.0  # how often the live-worker list is re-read
    start_timeout_s: float = 60.0  # start(): wait this long for a first live worker
    down_s: float = 5.0  # a worker that failed is passed over this long

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("refresh_s", "start_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.down_s < 0:
            raise ValueError("down_s must not be negative")


class WorkerTotals:
    """The workers' ``*_total`` counters summed so that the sum never goes backwards.

    A worker's counters start again from 0 when its process restarts, and vanish from the registry when it dies, so
    a plain sum over the live workers drops. Here each worker instance (id, address, start time) keeps the last
    values it reported after it is gone, and an instance whose counters went down (restarted in place, the same
    address and no start time: a static list) has its old values banked first. Bounded: past ``keep`` instances,
    the oldest is folded into the bank."""

    def __init__(self, keep: int = 1024) -> None:
        self.keep = keep
        self._last: dict[tuple[str, str, int, float], dict[str, float]] = {}
        self._banked: dict[str, float] = {}

    def update(self, members: Iterable[PoolMember]) -> None:
        for m in members:
            key = (m.id, m.host, m.port, m.started_at)
            now = {k: float(v) for k, v in m.stats.items() if k.endswith("_total")}
            last = self._last.pop(key, None)
            if last is not None and any(now.get(k, 0.0) < v for k, v in last.items()):
                self._bank(last)  # restarted: its earlier counts still happened
            self._last[key] = now  # most recently seen last
        while len(self._last) > self.keep:
            self._bank(self._last.pop(next(iter(self._last))))

    def totals(self) -> dict[str, float]:
        out = dict(self._banked)
        for values in self._last.values():
            for k, v in values.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def _bank(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self._banked[k] = self._banked.get(k, 0.0) + v


@dataclass
class _Counters:
    requests: int = 0
    failovers: int = 0
    lost_mid_turn: int = 0
    unavailable: int = 0


class PoolEngine:
    """See the module docstring."""

    def __init__(self, source: MemberSource, config: PoolConfig | None = None) -> None:
        self.source = source
        self.config = config or PoolConfig()
        self.info = EngineInfo(name="pool", sample_rate=44100, cloning=False)  # replaced by the workers' own
        self.members: list[PoolMember] = []  # the live workers, as last read
        self.counters = _Counters()
        self.totals = WorkerTotals()
        self._clients: dict[tuple[str, str, int], WorkerClient] = {}
        self._connecting: dict[tuple[str, str, int], asyncio.Lock] = {}
        self._down: dict[tuple[str, str, int], float] = {}  # member -> monotonic time it may be tried again
        # The source is read only by the refresher task, never on a request's path, and that task stops by flag:
        # a source doing network I/O may swallow a cancel (redis-py's asyncio client on Python 3.11 does).
        self._refresher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # refresh now, not at the next tick
        self._waiters: list[asyncio.Future[None]] = []  # resolved after the next refresh
        self._refreshed_at = 0.0
        self._started = False
        self._closed = False
        self._source_error: str | None = None

    # ---- lifecycle

    async def start(self) -> None:
        """Wait (``start_timeout_s``) for a live worker and adopt its ``EngineInfo``. Raises ``EngineError``."""
        if self._started:
            return
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="pool-refresh")
        deadline = time.monotonic() + self.config.start_timeout_s
        last = "no engine worker registered"
        while True:
            await self._await_refresh(self.config.refresh_s + 5)
            for member in self._ranked(uuid.uuid4().hex):
                try:
                    client = await self._client(member, adopt=True)
                except EngineError as exc:
                    last = str(exc)
                    continue
                self.info = client.info
                self._started = True
                return
            if self._source_error:
                last = self._source_error
            if time.monotonic() >= deadline:
                await self.aclose()
                raise EngineError(f"no live engine worker within {self.config.start_timeout_s:.0f} s: {last}")
            await asyncio.sleep(min(0.2, self.config.refresh_s))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._refresher is not None:
            self._wake.set()
            done, _ = await asyncio.wait([self._refresher], timeout=5.0)  # it sees _closed after its read
            if not done:
                self._refresher.cancel()
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.source.aclose()

    def health(self) -> str | None:
        if self._closed:
            return "closed"
        if not self._started:
            return "not started"
        if not self._usable():
            return f"no live engine worker ({self._source_error or 'none registered'})"
        return None

    def stats(self) -> dict[str, float]:
        """Pool counters plus the workers' stats by name (from their last heartbeats): gauges summed over the live
        workers, counters (``*_total``) over every worker instance seen, so they never go backwards."""
        total: dict[str, float] = {}
        for member in self.members:
            for name, value in member.stats.items():
                if not name.endswith("_total"):
                    total[name] = total.get(name, 0.0) + value
        total.update(self.totals.totals())
        c = self.counters
        total.update(
            pool_workers=len(self._usable()),
            pool_workers_registered=len(self.members),
            pool_connections=sum(1 for cl in self._clients.values() if not cl.closed),
            pool_requests_total=c.requests,
            pool_failovers_total=c.failovers,
            pool_lost_mid_turn_total=c.lost_mid_turn,
            pool_unavailable_total=c.unavailable,
        )
        return total

    def route(self, key: str) -> PoolMember | None:
        """The worker a request with this session key goes to now (None: no live worker)."""
        ranked = self._ranked(key)
        return ranked[0] if ranked else None

    # ---- synthesis

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        if not self._started or self._closed:
            raise EngineError(f"engine pool is {'closed' if self._closed else 'not started'}")
        self.counters.requests += 1
        key = request.session or uuid.uuid4().hex
        tried: set[tuple[str, str, int]] = set()
        failures: list[str] = []
        while True:
            member = await self._next(key, tried)
            if member is None:
                self.counters.unavailable += 1
                raise EngineError(self._no_worker(failures))
            tried.add(_key(member))
            try:
                client = await self._client(member)
            except EngineError as exc:
                failures.append(str(exc))
                self._mark_down(member, exc)
                self.counters.failovers += 1
                continue
            yielded = False
            stream = client.synthesize(request)
            try:
                async for chunk in stream:
                    yielded = True
                    yield chunk
                return
            except (WorkerLost, WorkerUnavailable) as exc:
                if self._closed:
                    return  # aclose() ends streams in flight
                if yielded:
                    self.counters.lost_mid_turn += 1
                    if isinstance(exc, WorkerLost):
                        self._mark_down(member, exc)
                    raise EngineError(f"{exc} during this turn; the next turn goes to another worker") from None
                failures.append(str(exc))
                self._mark_down(member, exc)
                self.counters.failovers += 1
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

    async def encode_voice(self, pcm: np.ndarray, sample_rate: int, text: str) -> np.ndarray | None:
        if not self._started or self._closed:
            raise EngineError(f"engine pool is {'closed' if self._closed else 'not started'}")
        tried: set[tuple[str, str, int]] = set()
        failures: list[str] = []
        key = uuid.uuid4().hex  # any worker: spread by a random key
        while (member := await self._next(key, tried)) is not None:
            tried.add(_key(member))
            try:
                client = await self._client(member)
                return await client.encode_voice(pcm, sample_rate, text)
            except (WorkerLost, WorkerUnavailable) as exc:
                failures.append(str(exc))
                self._mark_down(member, exc)
        raise EngineError(self._no_worker(failures))

    # ---- internals

    def _usable(self) -> list[PoolMember]:
        return [m for m in self.members if m.health is None]

    def _ranked(self, key: str, tried: set[tuple[str, str, int]] = frozenset()) -> list[PoolMember]:  # type: ignore[assignment]
        """Healthy workers not yet tried, best first; those recently down go last."""
        by_id = {m.id: m for m in self._usable() if _key(m) not in tried}
        ranked = [by_id[i] for i in rendezvous_rank(key, by_id)]
        now = time.monotonic()
        return [m for m in ranked if self._down.get(_key(m), 0) <= now] + [
            m for m in ranked if self._down.get(_key(m), 0) > now
        ]

    async def _next(self, key: str, tried: set[tuple[str, str, int]]) -> PoolMember | None:
        ranked = self._ranked(key, tried)
        if not ranked and time.monotonic() - self._refreshed_at > 0.25:  # maybe a worker just came up
            await self._await_refresh(3.0)
            ranked = self._ranked(key, tried)
        return ranked[0] if ranked else None

    async def _await_refresh(self, timeout_s: float) -> None:
        """Have the refresher read the source now; wait (bounded) until it has."""
        if self._refresher is None or self._refresher.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self._wake.set()
        await asyncio.wait([done], timeout=timeout_s)

    def _no_worker(self, failures: list[str]) -> str:
        if failures:
            return f"no engine worker could take the request: {'; '.join(failures[-3:])}"
        if self._source_error:
            return f"no live engine worker: {self._source_error}"
        return "no live engine worker"

    def _mark_down(self, member: PoolMember, exc: Exception) -> None:
        log.warning("engine worker %s (%s:%d) passed over for %.0f s: %s", member.id, member.host, member.port,
                    self.config.down_s, exc)
        self._down[_key(member)] = time.monotonic() + self.config.down_s
        client = self._clients.get(_key(member))
        if client is not None and client.closed:
            del self._clients[_key(member)]

    async def _client(self, member: PoolMember, adopt: bool = False) -> WorkerClient:
        key = _key(member)
        client = self._clients.get(key)
        if client is not None and not client.closed:
            return client
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:
            client = self._clients.get(key)
            if client is not None and not client.closed:
                return client
            client = await WorkerClient.connect(member.host, member.port, self.config)
            if not adopt and (client.info.sample_rate, client.info.name) != (self.info.sample_rate, self.info.name):
                await client.aclose()
                raise WorkerUnavailable(
                    f"engine worker {member.id} runs {client.info.name} at {client.info.sample_rate} Hz, the pool "
                    f"{self.info.name} at {self.info.sample_rate} Hz"
                )
            self._clients[key] = client
            return client

    async def _refresh(self) -> None:
        try:
            members = list(await self.source.members())
        except Exception as exc:  # the source is pluggable (Redis, a list): any failure keeps the last list
            if self._source_error is None:
                log.warning("cannot read the live engine workers (keeping the last list): %s", exc)
            self._source_error = f"worker registry unavailable: {type(exc).__name__}: {exc}"
            return
        self._source_error = None
        self._refreshed_at = time.monotonic()
        self.members = members
        self.totals.update(members)
        live = {_key(m) for m in members}
        for key, client in list(self._clients.items()):
            # a worker that left the registry is draining or dead: no new work; close its connection once idle
            if client.closed or (key not in live and client.in_flight == 0):
                del self._clients[key]
                await client.aclose()
        for key in [k for k, t in self._down.items() if t < time.monotonic() - 60]:
            del self._down[key]

    async def _refresh_loop(self) -> None:
        while not self._closed:
            waiters, self._waiters = self._waiters, []
            await self._refresh()
            for done in waiters:
                if not done.done():
                    done.set_result(None)
            if self._waiters:  # asked for again while reading
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.refresh_s * random.uniform(0.9, 1.1)):
                    await self._wake.wait()
            self._wake.clear()


def _key(member: PoolMember) -> tuple[str, str, int]:
    return member.id, member.host, member.port
