"""Bad requests and clients that leave early, through every adapter at once, never disturb another session."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgpack
import websockets

from tests.realtime.adapters.conftest import API_KEY
from tests.realtime.conftest import Client, Server

LONG = "This turn keeps speaking while other clients misbehave. " * 4


async def misbehave(server: Server) -> None:
    ws_base = server.url.replace("/v1/realtime", "")
    auth = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=server.http, headers=auth) as http:
        assert (await http.post("/v1/audio/speech", content=b"\xff\x00")).status_code == 400
        assert (await http.post("/v1/audio/speech", json={"model": "m", "voice": "v-none", "input": "x"})).status_code == 400
        assert (await http.post("/v1/tts", content=b"\xc1", headers={"content-type": "application/msgpack"})).status_code == 400
        # a client that leaves in the middle of a streamed body
        async with http.stream("POST", "/v1/audio/speech", json={"model": "m", "voice": "alloy", "input": LONG,
                                                                   "response_format": "pcm"}) as r:
            async for _ in r.aiter_bytes():
                break
    async with websockets.connect(ws_base + "/v1/tts/live", additional_headers=auth) as ws:
        await ws.send(b"\xc1 not msgpack")
        assert msgpack.unpackb(await ws.recv())["reason"] == "error"
        await ws.send(msgpack.packb({"event": "start", "request": {"text": "", "format": "pcm"}}))
        await ws.send(msgpack.packb({"event": "text", "text": LONG}))
        await ws.send(msgpack.packb({"event": "stop"}))
        await ws.recv()  # one audio event, then gone
    async with websockets.connect(ws_base + "/v1/text-to-speech/default/stream-input",
                                  additional_headers={"xi-api-key": "wrong"}) as ws:
        await ws.send(json.dumps({"text": " "}))
        assert json.loads(await ws.recv())["error"] == "unauthorized"
    async with websockets.connect(ws_base + "/v1/text-to-speech/default/multi-stream-input",
                                  additional_headers={"xi-api-key": API_KEY}) as ws:
        await ws.send(json.dumps({"text": " "}))
        await ws.send("not json")
        assert json.loads(await ws.recv())["error"] == "bad_message"
        await ws.send(json.dumps({"text": LONG, "context_id": "x", "flush": True}))
        await ws.recv()  # audio is flowing: leave without a word


async def test_misbehaving_adapter_clients_leave_other_sessions_alone(stub: Server) -> None:
    client = await Client.connect(stub.url + f"?token={API_KEY}")
    await client.start(output={"codec": "pcm16", "sample_rate": 24000})
    await client.send(type="text", text=LONG)
    await client.send(type="turn.end")
    await misbehave(stub)
    done, msgs = await client.until("turn.done", timeout=30)
    assert done["reason"] == "complete" and not [m for m in msgs if m["type"] == "error"]
    assert done["frames"] == len([m for m in msgs if m["type"] == "audio"])
    await client.close()
    async with httpx.AsyncClient(base_url=stub.http, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        for _ in range(50):  # every adapter connection winds down and releases its session
            metrics = (await http.get("/metrics")).text
            if "shoal_connections_open 0.0" in metrics:
                break
            await asyncio.sleep(0.1)
        assert "shoal_connections_open 0.0" in metrics
        assert (await http.get("/healthz")).json()["status"] == "ok"
