"""The engine-worker registry in Redis: who is alive, where, how loaded.

Layout (one pool's keys share a Redis Cluster hash tag, so its transactions stay on one slot):

    {prefix}:w:{<pool>}:index      sorted set of worker ids (score: first registration time)
    {prefix}:w:{<pool>}:<id>       string: msgpack WorkerRecord, with a TTL (PX) refreshed by every heartbeat

A worker calls ``heartbeat(record)`` every second or so; its key lives ``ttl_ms`` past the last one, so a worker
that stops (or is killed) drops out within the TTL without anyone cleaning up, and one that stops cleanly
``deregister``s at once. ``live()`` reads the index and the records in one round trip and prunes ids whose key
has expired. A record carries what a gateway needs to route and to report: address, load, health and the
engine's stats. Every Redis failure is raised as ``StoreError``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgpack  # type: ignore[import-untyped]
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sessions.connection import RedisConnection
from sessions.errors import StoreError

__all__ = ["WorkerRecord", "WorkerRegistry", "check_name"]

SCHEMA_VERSION = 1
# KEYS: index, then the keys of the ids in ARGV. Drops from the index the ids whose key is gone (checked here, in
# the script, so a worker that re-registered since the caller looked is not dropped).
_PRUNE = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('ZREM', KEYS[1], ARGV[i - 1]) end
end
return 0
"""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def check_name(value: object, what: str) -> str:
    """A worker id or pool name: 1-128 of letters, digits and ``_.:-``, starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} must match {_NAME.pattern}, got {value!r}")
    return value


@dataclass(frozen=True)
class WorkerRecord:
    id: str  # unique within its pool
    host: str  # where its RPC listens
    port: int
    pid: int = 0
    engine: Mapping[str, Any] = field(default_factory=dict)  # EngineInfo.to_wire() of the engine it serves
    load: int = 0  # requests in flight
    health: str | None = None  # None when ready to take requests
    stats: Mapping[str, float] = field(default_factory=dict)  # the engine's and the worker's counters
    started_at: float = 0.0
    updated_at: float = 0.0  # time of the heartbeat that wrote it

    def __post_init__(self) -> None:
        check_name(self.id, "worker id")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port must be within 1..65535, got {self.port!r}")
        if not self.host:
            raise ValueError("host must not be empty")


def encode_record(record: WorkerRecord) -> bytes:
    return msgpack.packb(
        {
            "v": SCHEMA_VERSION,
            "id": record.id,
            "host": record.host,
            "port": record.port,
            "pid": record.pid,
            "engine": dict(record.engine),
            "load": record.load,
            "health": record.health,
            "stats": {k: float(v) for k, v in record.stats.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            "started_at": record.started_at,
            "updated_at": record.updated_at,
        },
        use_bin_type=True,
    )


def decode_record(data: bytes) -> WorkerRecord:
    try:
        body = msgpack.unpackb(data, raw=False)
        if not isinstance(body, dict) or body.get("v") != SCHEMA_VERSION:
            raise ValueError(f"not a worker record of schema {SCHEMA_VERSION}")
        stats = body.get("stats") or {}
        return WorkerRecord(
            id=body["id"],
            host=body["host"],
            port=body["port"],
            pid=int(body.get("pid", 0)),
            engine=dict(body.get("engine") or {}),
            load=int(body.get("load", 0)),
            health=body.get("health"),
            stats={str(k): float(v) for k, v in stats.items() if isinstance(v, (int, float))},
            started_at=float(body.get("started_at", 0.0)),
            updated_at=float(body.get("updated_at", 0.0)),
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise StoreError(f"malformed worker record: {exc!r}") from exc


class WorkerRegistry:
    """The live workers of one pool (``connect`` ... ``aclose``). ``redis``: a URL (a connection pool of its own, made
    by ``connect`` and released by ``aclose``) or a shared ``RedisConnection`` (the gateway's, its store's: used,
    never closed here)."""

    def __init__(
        self,
        redis: str | RedisConnection,
        *,
        pool: str = "default",
        key_prefix: str = "shoal",
        ttl_ms: int = 4000,
        socket_timeout_s: float = 2.0,
    ) -> None:
        check_name(pool, "pool name")
        if ttl_ms < 100:
            raise ValueError("ttl_ms must be at least 100")
        self._owns = not isinstance(redis, RedisConnection)
        if not isinstance(redis, RedisConnection):
            redis = RedisConnection(redis, socket_timeout_s=socket_timeout_s)
        self.redis = redis
        self.pool = pool
        self.key_prefix = key_prefix
        self.ttl_ms = ttl_ms
        self._checked = False  # Redis answered once on this connection

    # -- lifecycle

    async def connect(self) -> None:
        """Make the connection pool (unless it is shared and made) and check that Redis answers (``StoreError`` if
        not). Idempotent."""
        if self._checked and self.redis.connected:
            return
        client = await self.redis.connect()
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            if self._owns:
                await self.aclose()
            raise StoreError(f"redis PING failed: {type(exc).__name__}: {exc}") from exc
        self._checked = True

    async def aclose(self) -> None:
        self._checked = False
        if self._owns:
            try:
                await self.redis.aclose()
            except StoreError:
                pass  # closing a broken pool: nothing left to release

    async def __aenter__(self) -> WorkerRegistry:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- keys

    @property
    def index_key(self) -> str:
        return f"{self.key_prefix}:w:{{{self.pool}}}:index"

    def worker_key(self, worker_id: str) -> str:
        return f"{self.key_prefix}:w:{{{self.pool}}}:{worker_id}"

    # -- operations

    async def heartbeat(self, record: WorkerRecord) -> None:
        """Write ``record`` (stamped now) with a fresh TTL and make sure it is in the index."""
        stamped = dataclasses.replace(record, updated_at=time.time())
        client = self._client
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(self.worker_key(record.id), encode_record(stamped), px=self.ttl_ms)
                pipe.zadd(self.index_key, {record.id: stamped.started_at or stamped.updated_at}, nx=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis worker heartbeat failed: {type(exc).__name__}: {exc}") from exc

    async def deregister(self, worker_id: str) -> bool:
        """Remove the worker now (a clean stop). True if it was registered."""
        client = self._client
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(self.worker_key(worker_id))
                pipe.zrem(self.index_key, worker_id)
                deleted, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis worker deregister failed: {type(exc).__name__}: {exc}") from exc
        return bool(deleted)

    async def live(self) -> list[WorkerRecord]:
        """The workers whose heartbeat has not expired, in registration order. Expired ids are pruned."""
        client = self._client
        try:
            ids = [i.decode() if isinstance(i, bytes) else i for i in await client.zrange(self.index_key, 0, -1)]
            if not ids:
                return []
            values = await client.mget([self.worker_key(i) for i in ids])
            gone = [i for i, v in zip(ids, values) if v is None]
            if gone:
                await client.eval(_PRUNE, 1 + len(gone), self.index_key, *map(self.worker_key, gone), *gone)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis worker list failed: {type(exc).__name__}: {exc}") from exc
        return [decode_record(v) for v in values if v is not None]

    @property
    def _client(self) -> aioredis.Redis:
        if not self.redis.connected:
            raise RuntimeError("WorkerRegistry is not connected; await connect() first")
        return self.redis.client
