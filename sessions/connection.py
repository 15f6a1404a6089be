"""The Redis connection pool a process shares: the session store and the worker registry run over one.

    redis = RedisConnection(url)         # nothing connects yet
    store = SessionStore(redis)          # the store owns it: ``store.connect()`` / ``store.aclose()``
    registry = WorkerRegistry(redis, pool="gpus")   # a guest on the same pool: its ``aclose()`` leaves it open

The gateway makes it with its store, connects it in the app's lifespan (``store.connect()``) and closes it there,
after the engine (and so the registry the worker pool reads) has closed. Given a URL instead, the store and the
registry each make and own one of their own.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sessions.errors import StoreError

__all__ = ["RedisConnection"]


class RedisConnection:
    """One ``redis.asyncio`` client (its connection pool), made on ``connect`` and released on ``aclose``."""

    def __init__(self, url: str, *, socket_timeout_s: float = 2.0) -> None:
        if socket_timeout_s <= 0:
            raise ValueError("socket_timeout_s must be positive")
        self.url = url
        self.socket_timeout_s = socket_timeout_s
        self._client: aioredis.Redis | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self) -> aioredis.Redis:
        """The client, made now if it is not yet (idempotent, no round trip)."""
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout_s,
                socket_connect_timeout=self.socket_timeout_s,
                # One quick retry on a connection error only: it replaces a pooled connection that a Redis restart
                # closed. Timeouts are not retried, so an outage surfaces after one socket timeout.
                retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1,
                            supported_errors=(RedisConnectionError,)),
            )
        return self._client

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("not connected; await connect() first")
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError) as exc:
                raise StoreError(f"redis close failed: {type(exc).__name__}: {exc}") from exc
