"""Concurrent contexts end to end: several turns of one session in flight at once on one socket, against a real
`shoal serve --engine stub` (the stub is a test instrument: deterministic tones at a GPU's cadence, 20 ms to the
first frame) with its embedded Redis."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.realtime.conftest import Client, Server, start_server

STUB_TTFT_S = 0.020


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data", "--engine", "stub", "--stub-ttft-ms", "20")
    yield srv
    srv.stop()


async def read_turns(client: Client, done: int, timeout: float = 30.0) -> list[tuple[float, dict[str, Any]]]:
    """Every message, with its arrival time, until ``done`` turn.done messages arrived."""
    got: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while sum(1 for _, m in got if m["type"] == "turn.done") < done:
        msg = await client.recv(max(0.05, deadline - time.monotonic()))
        got.append((time.monotonic(), msg))
    return got


async def say(client: Client, context: str, speaker: int, text: str) -> float:
    sent = time.monotonic()
    await client.send(type="text", text=text, speaker=speaker, context=context)
    await client.send(type="turn.end", context=context)
    return sent


async def test_two_contexts_speak_at_once_and_are_kept_in_start_order(stub: Server) -> None:
    client = await Client.connect(stub.url)
    sid = (await client.start(speakers=[{"speaker": 0}, {"speaker": 1}]))["session"]
    sent = {"guard": await say(client, "guard", 0, "Halt, who goes there? Stand where you are and show your hands.")}
    await asyncio.sleep(0.010)
    sent["traveller"] = await say(client, "traveller", 1, "Only a traveller, friend. I mean no harm at all.")
    got = await read_turns(client, done=2)

    by_context: dict[str, list[dict[str, Any]]] = defaultdict(list)
    first_audio: dict[str, float] = {}
    last_audio: dict[str, float] = {}
    for at, msg in got:
        if msg["type"] in ("turn.started", "segment", "audio", "turn.done"):
            by_context[msg["context"]].append(msg)  # every message of a turn names its context
        if msg["type"] == "audio":
            first_audio.setdefault(msg["context"], at)
            last_audio[msg["context"]] = at
    ttfa = {ctx: first_audio[ctx] - sent[ctx] for ctx in sent}
    print(f"\nfirst audio after the line was sent: guard {ttfa['guard'] * 1000:.1f} ms, traveller "
          f"{ttfa['traveller'] * 1000:.1f} ms (stub TTFT {STUB_TTFT_S * 1000:.0f} ms)")
    # the second line does not wait for the first: its first audio comes as fast as the first's (busy-machine slack)
    assert ttfa["traveller"] <= ttfa["guard"] + 0.050 and max(ttfa.values()) < 1.0
    assert first_audio["traveller"] < last_audio["guard"] and first_audio["guard"] < last_audio["traveller"]
    turns = {}
    for ctx, msgs in by_context.items():
        audio = [m for m in msgs if m["type"] == "audio"]
        done = [m for m in msgs if m["type"] == "turn.done"]
        assert [a["seq"] for a in audio] == list(range(len(audio))), ctx  # contiguous per context
        assert len(done) == 1 and done[0]["reason"] == "complete" and done[0]["frames"] == len(audio)
        turns[ctx] = done[0]["turn"]
    assert turns == {"guard": 0, "traveller": 1}
    await client.close()

    again = await Client.connect(stub.url)
    ready = await again.start(session=sid)
    assert [(h["turn"], h["speaker"], h["text"][:5]) for h in ready["history"]] == [(0, 0, "Halt,"), (1, 1, "Only ")]
    await again.close()


async def test_cancel_one_context_and_the_other_plays_on(stub: Server) -> None:
    client = await Client.connect(stub.url)
    sid = (await client.start())["session"]
    await say(client, "a", 0, "This line will be interrupted before it is over. " * 3)
    await say(client, "b", 1, "This one plays to its end.")
    heard = 0
    while heard < 5:  # the listener has 100 ms of "a" (and some of "b")
        heard += (await client.until("audio"))[0]["context"] == "a"
    await client.send(type="playback", turn=0, played_ms=46.0, context="a")
    await client.send(type="cancel", context="a")
    got = await read_turns(client, done=2)
    done = {m["context"]: m for _, m in got if m["type"] == "turn.done"}
    assert done["a"]["reason"] == "cancelled" and done["b"]["reason"] == "complete"
    late_a = [m for _, m in got if m["type"] == "audio" and m["context"] == "a" and m["seq"] > done["a"]["frames"]]
    assert not late_a
    await client.close()
    again = await Client.connect(stub.url)
    history = (await again.start(session=sid))["history"]
    first = "This line will be interrupted before it is over."
    cut = history[0]["text"]  # cut where the listener stopped: the words that had started, by character share
    assert history[0]["audio_ms"] == 46 and cut.startswith("This") and first.startswith(cut) and len(cut) < len(first)
    assert history[1]["text"] == "This one plays to its end." and history[1]["state"] == "complete"
    await again.close()


async def test_the_ninth_context_gets_limit_and_the_session_stays_usable(stub: Server) -> None:
    client = await Client.connect(stub.url)
    await client.start()
    for i in range(8):
        await client.send(type="text", text="Hello there, how are you today? ", context=f"npc-{i}")
    await client.send(type="text", text="One too many. ", context="npc-8")
    error, _ = await client.until("error")
    assert error["code"] == "limit" and "8 contexts" in error["message"] and not error["fatal"]
    await client.ping()
    await client.send(type="cancel")
    got = await read_turns(client, done=8)
    assert sorted(m["context"] for _, m in got if m["type"] == "turn.done") == [f"npc-{i}" for i in range(8)]
    await client.close()


async def test_mix_gives_one_gapless_stream_as_long_as_the_overlap(stub: Server) -> None:
    client = await Client.connect(stub.url)
    ready = await client.start(output={"codec": "pcm16", "sample_rate": 24000, "frame_ms": 20, "mix": True})
    assert ready["output"]["mix"] is True
    await say(client, "long", 0, "A long line that keeps going for quite a while, well past the other one. " * 2)
    await say(client, "short", 1, "A short one.")
    got = [m for _, m in await read_turns(client, done=2)]
    audio = [m for m in got if m["type"] == "audio"]
    done = {m["context"]: m for m in got if m["type"] == "turn.done"}
    assert all("context" not in a for a in audio)  # one stream
    assert [a["seq"] for a in audio] == list(range(len(audio)))  # one seq, no gaps
    assert [a["ms"] for a in audio] == [20.0 * i for i in range(len(audio))]
    frames = {ctx: d["frames"] for ctx, d in done.items()}
    print(f"\nmixed stream: {len(audio)} packets for turns of {frames['long']} and {frames['short']} frames")
    assert done["long"]["reason"] == done["short"]["reason"] == "complete"
    assert frames["long"] <= len(audio) <= frames["long"] + 5  # the overlap's length, not the sum
    assert frames["short"] > 10
    pcm = np.frombuffer(b"".join(a["data"] for a in audio), dtype="<i2").astype(np.float32) / 32768
    per_packet = pcm[: len(audio) * 480].reshape(len(audio), 480)
    assert np.sqrt((per_packet[:-1] ** 2).mean(axis=1)).min() > 0.005  # no silent gap inside the stream
    await client.close()


async def test_a_cancel_after_turn_done_gives_the_next_turn_its_head_start(stub: Server) -> None:
    """turn.done leaves up to lead_ms before the listener hears the end; a cancel then means the client dropped its
    buffer, so the next turn is sent ahead again (not at the pace of a buffer the client no longer has)."""
    client = await Client.connect(stub.url)
    await client.start(output={"codec": "pcm16", "sample_rate": 16000, "frame_ms": 20})
    await say(client, "x", 0, "A first line, complete before the listener has heard all of it.")
    done, _ = await client.until("turn.done")
    await client.send(type="playback", turn=done["turn"], played_ms=500.0)
    await client.send(type="cancel")
    await say(client, "x", 0, "The next line should arrive with a head start again, not in real time. " * 2)
    first, _ = await client.until("audio")
    got_ms, t0 = 20.0, time.monotonic()
    while time.monotonic() - t0 < 0.3:
        try:
            msg = await client.recv(timeout=max(0.01, 0.3 - (time.monotonic() - t0)))
        except TimeoutError:
            break
        got_ms += 20.0 if msg["type"] == "audio" else 0.0
    print(f"\naudio received in the first 300 ms of the next turn: {got_ms:.0f} ms")
    assert got_ms >= 600.0
    await client.close()


async def test_max_contexts_is_a_serve_option(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", "--engine", "stub", "--max-contexts", "2")
    try:
        client = await Client.connect(srv.url)
        await client.start()
        for ctx in ("a", "b", "c"):
            await client.send(type="text", text="Hello there, a long enough line. ", context=ctx)
        error, _ = await client.until("error")
        assert error["code"] == "limit" and "at most 2 contexts" in error["message"]
        await client.close()
    finally:
        srv.stop()
