"""``ServerConfig.encode_on_loop``: a stream's audio encoded on the event loop instead of the codec thread pool gives
the client the same packets, and leaves the pool unused. Real uvicorn on a free port, real Redis, the stub engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from engine.stub import StubConfig, StubSynthesizer
from realtime.app import create_app
from realtime.config import ServerConfig
from sessions.store import SessionStore
from tests.realtime.conftest import Client


@asynccontextmanager
async def serving(redis_server: str, config: ServerConfig) -> AsyncIterator[tuple[str, Any]]:
    store = SessionStore(redis_server, key_prefix=f"test-{uuid.uuid4().hex[:12]}")
    app = create_app(config, StubSynthesizer(StubConfig(ttft_ms=0.0, frame_ms=2.0)), store)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/v1/realtime", app.state.gateway
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def packets(url: str, output: dict[str, Any]) -> list[bytes]:
    client = await Client.connect(url)
    await client.start(output=output)
    await client.send(type="text", text="One sentence, then another one to make a few chunks of audio.")
    await client.send(type="turn.end")
    done, before = await client.until("turn.done")
    await client.close()
    assert done["reason"] == "complete"
    return [m["data"] for m in before if m["type"] == "audio"]


async def test_encoding_on_the_loop_sends_the_same_packets(redis_server: str) -> None:
    used: Callable[[Any], int] = lambda gateway: len(gateway.codec_pool._threads)  # noqa: E731
    for output in ({"codec": "opus"}, {"codec": "pcm16", "sample_rate": 24000}):
        async with serving(redis_server, ServerConfig()) as (url, gateway):
            pooled = await packets(url, output)
            assert used(gateway) > 0
        async with serving(redis_server, ServerConfig(encode_on_loop=True)) as (url, gateway):
            on_loop = await packets(url, output)
            assert used(gateway) == 0, "encode_on_loop still used the codec thread pool"
        assert len(pooled) > 5 and on_loop == pooled
