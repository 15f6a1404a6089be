"""Fixtures for the adapters' end-to-end tests: one real `shoal serve --engine stub` per module (the stub's audio
is a pure function of the text, so every duration can be checked against protocol v1's own answer), and helpers
that decode what the vendors' formats carry."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from tests.realtime.conftest import Client, Server, start_server

API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A stub-engine server with an API key (every client here sends it; the auth tests send a wrong one)."""
    srv = start_server(Path(tmp_path_factory.mktemp("adapters")) / "data", "--engine", "stub", "--api-key", API_KEY)
    yield srv
    srv.stop()


def duration_s(data: bytes, fmt: str, rate: int) -> float:
    """Seconds of audio in ``data``: raw PCM16 / mu-law counted, every container decoded with FFmpeg."""
    if fmt == "pcm":
        return len(data) / 2 / rate
    if fmt == "ulaw":
        return len(data) / rate
    samples, got = 0, rate
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
            got = frame.sample_rate
    return samples / got


async def v1_audio_ms(server: Server, text: str, voice: str | None = None) -> float:
    """What protocol v1 says the stub makes of ``text`` (one turn, speaker 0): the reference duration."""
    client = await Client.connect(server.url + f"?token={API_KEY}")
    await client.start(speakers=[{"speaker": 0, "voice": voice}], output={"codec": "pcm16", "sample_rate": 24000})
    await client.send(type="text", text=text)
    await client.send(type="turn.end")
    done, _ = await client.until("turn.done")
    await client.close()
    return float(done["audio_ms"])


def assert_duration(got_s: float, expected_ms: float, fmt: str) -> None:
    """Within the last partial frame (20 ms) below, and the codec's padding above (MP3/AAC add up to ~90 ms)."""
    slack = {"mp3": 110.0, "aac": 110.0}.get(fmt, 25.0)
    assert expected_ms - 25.0 <= got_s * 1000.0 <= expected_ms + slack, (fmt, got_s, expected_ms)
