from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from sessions.embedded import EmbeddedRedis
from sessions.store import SessionStore


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a real redis-server, started for this test run in a temporary data dir."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
async def store(redis_server: str) -> AsyncIterator[SessionStore]:
    """A connected store with a key prefix of its own, so tests never see each other's keys."""
    async with SessionStore(redis_server, key_prefix=f"test-{uuid.uuid4().hex[:12]}") as s:
        yield s
