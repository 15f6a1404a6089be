"""Fish Audio's live WebSocket and HTTP TTS through the official `fish-audio-sdk` (`fishaudio`), pointed at a real
`shoal serve` by `base_url`; a new `start` on the same socket through a client written from Fish's API reference
(the SDK opens a socket per call)."""

from __future__ import annotations

import asyncio
import re

import httpx
import msgpack
import numpy as np
import pytest
import websockets
from fishaudio import AsyncFishAudio
from fishaudio.exceptions import APIError, AuthenticationError, WebSocketError
from fishaudio.types import FlushEvent, ReferenceAudio, TTSConfig

from realtime.adapters.containers import ContainerEncoder
from realtime.audio import write_wav
from tests.realtime.adapters.conftest import API_KEY, assert_duration, duration_s, v1_audio_ms
from tests.realtime.conftest import Client, Server

TEXT = "Hello there. How are you doing today?"
FORMATS = ["mp3", "wav", "pcm", "opus"]


def fish(server: Server, key: str = API_KEY) -> AsyncFishAudio:
    return AsyncFishAudio(api_key=key, base_url=server.http)


async def text_stream(parts: list[str | FlushEvent]):  # type: ignore[no-untyped-def]
    for part in parts:
        yield part


@pytest.mark.parametrize("fmt", FORMATS)
async def test_http_each_format(stub: Server, fmt: str) -> None:
    expected = await v1_audio_ms(stub, TEXT)
    rate = 48000 if fmt == "opus" else 44100  # Fish's defaults
    audio = await fish(stub).tts.convert(text=TEXT, format=fmt)  # type: ignore[arg-type]
    assert_duration(duration_s(audio, fmt, rate), expected, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_live_websocket_each_format(stub: Server, fmt: str) -> None:
    expected = await v1_audio_ms(stub, TEXT)
    chunks = [c async for c in fish(stub).tts.stream_websocket(
        text_stream(["Hello there. ", "How are ", "you doing ", "today?"]), format=fmt,  # type: ignore[arg-type]
        config=TTSConfig(sample_rate=24000 if fmt != "opus" else 48000))]
    assert len(chunks) > 3, "audio streams in pieces, as it is made"
    assert_duration(duration_s(b"".join(chunks), fmt, 24000 if fmt != "opus" else 48000), expected, fmt)


async def test_flush_speaks_what_is_buffered(stub: Server) -> None:
    """`flush` cuts a segment where it is, so the audio is that of two pieces of text, not one."""
    parts = ["Hello there and ", FlushEvent(), "how are you"]
    joined = await v1_audio_ms(stub, "Hello there and how are you")
    chunks = [c async for c in fish(stub).tts.stream_websocket(text_stream(parts), format="pcm")]  # type: ignore[arg-type]
    assert duration_s(b"".join(chunks), "pcm", 44100) * 1000 != pytest.approx(joined, abs=1.0)


def reference_wav(tmp: bytes | None = None) -> bytes:
    import io

    t = np.arange(int(2.0 * 16000)) / 16000
    buf = io.BytesIO()
    write_wav(buf, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return buf.getvalue()


async def voices_created(server: Server) -> float:
    async with httpx.AsyncClient(base_url=server.http, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        text = (await http.get("/metrics")).text  # /metrics is for operators: a key once keys are set
    m = re.search(r"^shoal_voices_created_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_inline_references_are_registered_once(stub: Server) -> None:
    wav = reference_wav()
    mp3 = ContainerEncoder("mp3", 16000)
    mp3_bytes = mp3.push(np.frombuffer(wav[44:], "<i2").tobytes()) + mp3.close()
    before = await voices_created(stub)
    for audio in (wav, wav, mp3_bytes, mp3_bytes):
        ref = [ReferenceAudio(audio=audio, text="A reference voice for the test.")]
        got = await fish(stub).tts.convert(text="Cloned.", format="pcm", references=ref)
        assert duration_s(got, "pcm", 44100) > 0.1
    assert await voices_created(stub) == before + 2  # the WAV once, the MP3 once
    chunks = [c async for c in fish(stub).tts.stream_websocket(text_stream(["Live and cloned."]), format="pcm",
                                                              references=[ReferenceAudio(audio=wav, text="A reference voice for the test.")])]
    assert chunks and await voices_created(stub) == before + 2


async def test_errors_and_auth(stub: Server) -> None:
    with pytest.raises(AuthenticationError):
        await fish(stub, "wrong").tts.convert(text=TEXT)
    with pytest.raises(APIError) as bad:
        await fish(stub).tts.convert(text=TEXT, reference_id="no-such-voice")
    assert bad.value.status == 400 and "not registered" in bad.value.message
    for key, voice in (("wrong", None), (API_KEY, "no-such-voice")):
        with pytest.raises(Exception) as live:  # the SDK's task group wraps its WebSocketError
            _ = [c async for c in fish(stub, key).tts.stream_websocket(text_stream(["Hi."]), reference_id=voice)]
        found = live.value.exceptions if isinstance(live.value, BaseExceptionGroup) else [live.value]
        assert any(isinstance(e, WebSocketError) for e in found), found
    async with httpx.AsyncClient(base_url=stub.http, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        for request in ({"text": TEXT, "prosody": {"volume": 30}}, {"text": TEXT, "format": "ogg"},
                        {"text": TEXT, "format": "opus", "sample_rate": 44100}, {"text": ""}):
            r = await http.post("/v1/tts", content=msgpack.packb(request),
                                headers={"content-type": "application/msgpack", "model": "s2-pro"})
            assert r.status_code == 400 and r.json()["status"] == 400 and r.json()["message"], request


class LiveClient:
    """Fish's live protocol written from its API reference: msgpack events over one socket."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws

    async def send(self, **event: object) -> None:
        await self.ws.send(msgpack.packb(event, use_bin_type=True))

    async def request(self, request: dict, parts: list[str]) -> tuple[bytes, dict]:
        await self.send(event="start", request={"text": "", **request})
        for part in parts:
            await self.send(event="text", text=part)
        await self.send(event="stop")
        audio = b""
        while True:
            event = msgpack.unpackb(await asyncio.wait_for(self.ws.recv(), 20), raw=False)
            if event["event"] == "audio":
                audio += event["audio"]
            elif event["event"] == "finish":
                return audio, event


async def test_a_new_start_after_finish_and_resume_over_v1(stub: Server) -> None:
    expected = await v1_audio_ms(stub, TEXT)
    url = stub.url.replace("/v1/realtime", "/v1/tts/live") + "?session=fish-live-1"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}", "model": "s2-pro"},
                                  max_size=None) as ws:
        live = LiveClient(ws)
        wav, finish = await live.request({"format": "wav", "sample_rate": 24000}, [TEXT])
        assert finish == {"event": "finish", "reason": "stop"}
        assert_duration(duration_s(wav, "wav", 24000), expected, "wav")
        mp3, finish = await live.request({"format": "mp3", "sample_rate": 22050, "prosody": {"volume": -6}}, [TEXT])
        assert finish["reason"] == "stop"
        assert_duration(duration_s(mp3, "mp3", 22050), expected, "mp3")
        empty, finish = await live.request({"format": "pcm"}, [])
        assert empty == b"" and finish["reason"] == "stop"
        await live.send(event="text", text="no start")  # refused politely, the socket goes on
        again, finish = await live.request({"format": "pcm", "sample_rate": 24000}, ["Once more."])
        assert finish["reason"] == "stop" and again
    v1 = await Client.connect(stub.url + f"?token={API_KEY}")
    ready = await v1.start(session="fish-live-1")
    assert ready["resumed"] is True and [t["text"] for t in ready["history"]][:2] == [TEXT, TEXT]
    assert ready["history"][-1]["text"] == "Once more."
    await v1.close()
