from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sessions.store import SessionStore

# sessions/ (redis, platformdirs) is imported inside the fixtures: the GPU check runs tests/engine/dualar in place on
# the lent machine's image, which has torch but not the server's dependencies.


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a real redis-server, started for this test run in a temporary data dir."""
    from sessions.embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
async def store(redis_server: str) -> AsyncIterator[SessionStore]:
    """A connected store with a key prefix of its own, so tests never see each other's keys."""
    from sessions.store import SessionStore

    async with SessionStore(redis_server, key_prefix=f"test-{uuid.uuid4().hex[:12]}") as s:
        yield s
