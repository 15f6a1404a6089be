"""A connection whose task fails: logged once with the session id and traceback, the client told (``internal``,
fatal) and closed with 1011, and everything released (lease, sessions gauge). Real uvicorn on a free port, real
Redis, the stub engine (a test instrument); the fault is a store that breaks the way a bug would (a TypeError
instead of a StoreError) — the one thing this test must control."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
import websockets

from engine.stub import StubConfig, StubSynthesizer
from realtime.app import create_app
from realtime.config import ServerConfig
from sessions.model import Turn
from sessions.store import SessionStore
from tests.realtime.conftest import Client


class BrokenStore(SessionStore):
    """A real store whose turn append fails like a bug, not like an outage."""

    async def append_turn(self, session_id: str, turn: Turn) -> int:
        raise TypeError("simulated bug in the store writer")


@pytest.fixture
async def served(redis_server: str) -> AsyncIterator[tuple[str, str, SessionStore]]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    app = create_app(ServerConfig(), StubSynthesizer(StubConfig(ttft_ms=0.0, frame_ms=5.0)),
                     BrokenStore(redis_server, key_prefix=prefix))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                           ws_ping_interval=1.0, ws_ping_timeout=8.0))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with SessionStore(redis_server, key_prefix=prefix) as check:
        yield f"ws://127.0.0.1:{port}/v1/realtime", f"http://127.0.0.1:{port}", check
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def test_a_failing_task_is_logged_once_told_and_released(
    served: tuple[str, str, SessionStore], caplog: pytest.LogCaptureFixture
) -> None:
    url, http, check = served
    caplog.set_level(logging.WARNING, logger="shoal")
    client = await Client.connect(url)
    sid = (await client.start())["session"]
    await client.send(type="text", text="Hello there.")
    await client.send(type="turn.end")
    done, _ = await client.until("turn.done")
    assert done["reason"] == "complete"  # the audio went out; then the writer hit the bug
    error, _ = await client.until("error")
    assert error["code"] == "internal" and error["fatal"] is True
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011

    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert sid in failures[0].getMessage() and failures[0].exc_info is not None
    assert "simulated bug in the store writer" in caplog.text  # the traceback names the cause

    async with httpx.AsyncClient() as http_client:
        for _ in range(100):
            metrics = (await http_client.get(f"{http}/metrics")).text
            if "shoal_sessions_open 0.0" in metrics:
                break
            await asyncio.sleep(0.05)
    assert "shoal_sessions_open 0.0" in metrics and "shoal_connection_failures_total 1.0" in metrics
    assert await check.acquire(sid, "someone-else", 1000), "the failed connection still holds the session"
