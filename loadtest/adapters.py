"""TTFA through each adapter against protocol v1, same server, same text, same run.

    python -m loadtest.adapters [--url ws://HOST:PORT/v1/realtime | --serve stub] [--sessions 10] [--rounds 11]

Each round runs ``--sessions`` concurrent clients of one API, each speaking the same sentence once; the APIs take
turns, in a rotated order each round, and round 0 is warm-up. TTFA is the client's: from sending the message that
completes the request to the first audio bytes received. Sockets that carry many turns stay open between rounds
(protocol v1, Fish live, ElevenLabs multi-stream-input), so their TTFA is a turn's; an HTTP request (keep-alive)
and an ElevenLabs stream-input socket carry one turn each, so theirs includes creating the session. Every API asks
for PCM16 at 24 kHz, so the difference is the adapter's, not a codec's (``openai mp3`` adds the MP3 encoder).
Raw samples go to ``--json`` first; the summary is computed from them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgpack
import websockets

TEXT = "Hello there, this is a short test of the time to first audio."
RATE = 24000
KEY = "loadtest-key"


class Target:
    def __init__(self, url: str, key: str | None) -> None:
        self.ws = url.removesuffix("/v1/realtime")
        self.http = self.ws.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.key = key


async def ttfa_of(ws: Any, t0: float, decode: Callable[[Any], dict[str, Any]], is_audio: Callable[[dict], bool],
                  is_end: Callable[[dict], bool]) -> float:
    """Read one turn's answers to its end; seconds from ``t0`` to the first audio."""
    ttfa = None
    while True:
        msg = decode(await ws.recv())
        if ttfa is None and is_audio(msg):
            ttfa = time.perf_counter() - t0
        elif is_end(msg):
            assert ttfa is not None and msg.get("reason", "stop") in ("stop", "complete"), msg
            return ttfa


class V1:
    """Protocol v1: a session per client, a turn per round (TTFA from turn.end)."""

    name = "protocol v1"

    def __init__(self, target: Target) -> None:
        self.t = target
        self.ws: Any = None

    async def open(self) -> None:
        self.ws = await websockets.connect(self.t.ws + "/v1/realtime", additional_headers=self.t.headers,
                                           max_size=None)
        await self.ws.send(msgpack.packb({"type": "session.start",
                                          "output": {"codec": "pcm16", "sample_rate": RATE}}))
        while msgpack.unpackb(await self.ws.recv())["type"] != "session.ready":
            pass

    async def turn(self) -> float:
        await self.ws.send(msgpack.packb({"type": "text", "text": TEXT}))
        t0 = time.perf_counter()
        await self.ws.send(msgpack.packb({"type": "turn.end"}))
        return await ttfa_of(self.ws, t0, msgpack.unpackb, lambda m: m["type"] == "audio",
                             lambda m: m["type"] == "turn.done")

    async def close(self) -> None:
        await self.ws.close()


class FishLive(V1):
    """Fish live WebSocket: a socket per client, start/text/stop per round (TTFA from stop)."""

    name = "fish live ws"

    async def open(self) -> None:
        self.ws = await websockets.connect(self.t.ws + "/v1/tts/live", additional_headers=self.t.headers,
                                           max_size=None)

    async def turn(self) -> float:
        await self.ws.send(msgpack.packb({"event": "start", "request": {"text": "", "format": "pcm",
                                                                         "sample_rate": RATE}}))
        await self.ws.send(msgpack.packb({"event": "text", "text": TEXT}))
        t0 = time.perf_counter()
        await self.ws.send(msgpack.packb({"event": "stop"}))
        return await ttfa_of(self.ws, t0, msgpack.unpackb, lambda e: e["event"] == "audio",
                             lambda e: e["event"] == "finish")


class ElevenMulti(V1):
    """ElevenLabs multi-stream-input: a socket per client, a context per round (TTFA from the flush)."""

    name = "elevenlabs multi-stream-input"

    async def open(self) -> None:
        self.round = 0
        self.ws = await websockets.connect(
            self.t.ws + "/v1/text-to-speech/default/multi-stream-input?output_format=pcm_24000",
            additional_headers={"xi-api-key": self.t.key} if self.t.key else {}, max_size=None)
        await self.ws.send(json.dumps({"text": " "}))

    async def turn(self) -> float:
        self.round += 1
        context = f"r{self.round}"
        await self.ws.send(json.dumps({"text": TEXT + " ", "context_id": context}))
        t0 = time.perf_counter()
        await self.ws.send(json.dumps({"context_id": context, "flush": True}))
        await self.ws.send(json.dumps({"context_id": context, "close_context": True}))
        return await ttfa_of(self.ws, t0, json.loads, lambda a: bool(a.get("audio")), lambda a: bool(a.get("isFinal")))


class ElevenStream(V1):
    """ElevenLabs stream-input: a socket per turn; opened and initialised before the clock starts."""

    name = "elevenlabs stream-input"

    async def open(self) -> None:
        pass

    async def turn(self) -> float:
        async with websockets.connect(
            self.t.ws + "/v1/text-to-speech/default/stream-input?output_format=pcm_24000",
            additional_headers={"xi-api-key": self.t.key} if self.t.key else {}, max_size=None,
        ) as ws:
            await ws.send(json.dumps({"text": " "}))
            await asyncio.sleep(0.2)  # the session starts on the initial message; the clock starts with the text
            t0 = time.perf_counter()
            await ws.send(json.dumps({"text": TEXT + " "}))
            await ws.send(json.dumps({"text": ""}))
            return await ttfa_of(ws, t0, json.loads, lambda a: bool(a.get("audio")), lambda a: bool(a.get("isFinal")))

    async def close(self) -> None:
        pass


class Http(V1):
    """An HTTP endpoint on a keep-alive client: a request per round (TTFA from the request to the first bytes)."""

    def __init__(self, target: Target, name: str, path: str, body: dict[str, Any], msgpack_body: bool = False) -> None:
        super().__init__(target)
        self.name, self.path, self.body, self.msgpack_body = name, path, body, msgpack_body
        self.client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.t.http, headers=self.t.headers, timeout=30)
        await self.client.get("/healthz")  # the connection is made before the clock starts

    async def turn(self) -> float:
        assert self.client is not None
        kw: dict[str, Any] = {"json": self.body}
        if self.msgpack_body:
            kw = {"content": msgpack.packb(self.body), "headers": {"content-type": "application/msgpack"}}
        t0 = time.perf_counter()
        ttfa = None
        async with self.client.stream("POST", self.path, **kw) as r:
            assert r.status_code == 200, r.status_code
            async for chunk in r.aiter_raw():
                if chunk and ttfa is None:
                    ttfa = time.perf_counter() - t0
        assert ttfa is not None
        return ttfa

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def apis(target: Target) -> list[Callable[[], V1]]:
    openai = {"model": "tts-1", "voice": "alloy", "input": TEXT}
    return [
        lambda: V1(target),
        lambda: FishLive(target),
        lambda: ElevenMulti(target),
        lambda: ElevenStream(target),
        lambda: Http(target, "openai http pcm", "/v1/audio/speech", {**openai, "response_format": "pcm"}),
        lambda: Http(target, "openai http mp3", "/v1/audio/speech", {**openai, "response_format": "mp3"}),
        lambda: Http(target, "fish http pcm", "/v1/tts", {"text": TEXT, "format": "pcm", "sample_rate": RATE},
                     msgpack_body=True),
    ]


async def run(target: Target, sessions: int, rounds: int) -> dict[str, list[list[float]]]:
    """Raw TTFA samples (seconds) per API, per round."""
    makers = apis(target)
    clients: list[list[V1]] = [[make() for _ in range(sessions)] for make in makers]
    for group in clients:
        await asyncio.gather(*(c.open() for c in group))
    samples: dict[str, list[list[float]]] = {group[0].name: [] for group in clients}
    for r in range(rounds):
        order = clients[r % len(clients):] + clients[: r % len(clients)]
        for group in order:
            ttfa = await asyncio.gather(*(c.turn() for c in group))
            samples[group[0].name].append(list(ttfa))
            await asyncio.sleep(0.3)  # let the last turn's audio play out of the pacing window
        print(f"round {r} done", file=sys.stderr)
    for group in clients:
        await asyncio.gather(*(c.close() for c in group))
    return samples


def summary(samples: dict[str, list[list[float]]], warmup: int = 1) -> str:
    def stats(xs: list[float]) -> tuple[float, float, float]:
        xs = sorted(x * 1000 for x in xs)
        return statistics.median(xs), xs[min(len(xs) - 1, int(0.9 * len(xs)))], xs[-1]

    rows = {name: stats([x for rnd in rounds[warmup:] for x in rnd]) for name, rounds in samples.items()}
    base = rows["protocol v1"][0]
    lines = ["| API | TTFA p50 | p90 | max | overhead over v1 (p50) |", "|---|---|---|---|---|"]
    for name, (p50, p90, top) in rows.items():
        over = "—" if name == "protocol v1" else f"{p50 - base:+.1f} ms"
        lines.append(f"| {name} | {p50:.1f} ms | {p90:.1f} ms | {top:.1f} ms | {over} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.adapters", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server's ws://HOST:PORT/v1/realtime (default: start one)")
    p.add_argument("--serve", default="stub", help="engine of the server started here (default stub)")
    p.add_argument("--key", help="its API key (a server started here gets one)")
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--rounds", type=int, default=11, help="rounds per API, the first one warm-up (default 11)")
    p.add_argument("--json", type=Path, help="write the raw samples here")
    args = p.parse_args(argv)
    server = None
    key = args.key
    if args.url is None:
        from loadtest.server import ServerProcess

        key = KEY
        server = ServerProcess(args.serve, Path("adapters-server.log"), ["--api-key", KEY])
    try:
        target = Target(args.url or server.url, key)  # type: ignore[union-attr]
        samples = asyncio.run(run(target, args.sessions, args.rounds))
    finally:
        if server is not None:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps({"sessions": args.sessions, "text": TEXT, "samples_s": samples}))
    print(summary(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
