"""The Synthesizer contract, run against every engine that runs on this machine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from engine.base import AudioChunk, EngineError, Sampling, SynthesisRequest, Synthesizer, VoiceRef
from engine.registry import make_engine

ENGINES: dict[str, dict[str, object]] = {
    "espeak": {"workers": 2},
    "stub": {"ttft_ms": 5, "frame_ms": 1},
}
SENTENCE = "The quick brown fox jumps over the lazy dog."
LONG = " ".join(f"This is sentence number {i} of a long and winding reply." for i in range(40))


@pytest.fixture(params=sorted(ENGINES))
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Synthesizer]:
    synth = make_engine(request.param, **ENGINES[request.param])
    await synth.start()
    yield synth
    await synth.aclose()


async def collect(synth: Synthesizer, text: str, **fields: object) -> list[AudioChunk]:
    async with asyncio.timeout(30):
        return [chunk async for chunk in synth.synthesize(SynthesisRequest(text, **fields))]  # type: ignore[arg-type]


def seconds(synth: Synthesizer, chunks: list[AudioChunk]) -> float:
    return sum(c.pcm.size for c in chunks) / synth.info.sample_rate


async def test_started_engine_is_a_healthy_synthesizer(engine: Synthesizer) -> None:
    assert isinstance(engine, Synthesizer)
    assert engine.health() is None
    assert 8000 <= engine.info.sample_rate <= 48000
    assert engine.info.to_wire()["name"] == engine.info.name
    assert await engine.encode_voice(np.zeros(16000, np.float32), 16000, "hi") is None


async def test_streams_non_silent_float32_audio_of_plausible_length(engine: Synthesizer) -> None:
    chunks = await collect(engine, SENTENCE)
    assert len(chunks) > 1  # streamed, not one blob
    for chunk in chunks:
        assert chunk.pcm.dtype == np.float32 and chunk.pcm.ndim == 1 and chunk.pcm.size > 0
        assert np.all(np.isfinite(chunk.pcm)) and np.abs(chunk.pcm).max() <= 1.0
        if chunk.codes is not None:
            assert chunk.codes.dtype == np.int16 and chunk.codes.shape[0] == 10
    audio = np.concatenate([c.pcm for c in chunks])
    assert 1.0 < seconds(engine, chunks) < 10.0  # 44 characters of speech
    assert np.sqrt(np.mean(audio**2)) > 0.01
    chunk_levels = [float(np.sqrt(np.mean(c.pcm**2))) for c in chunks]
    assert max(chunk_levels) > 2 * min(chunk_levels)  # it varies, like speech


async def test_closing_mid_stream_releases_the_engine(engine: Synthesizer) -> None:
    stream = engine.synthesize(SynthesisRequest(LONG))
    async with asyncio.timeout(10):
        for _ in range(3):
            await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
    assert seconds(engine, await collect(engine, SENTENCE)) > 1.0


async def test_cancelling_the_consumer_task_releases_the_engine(engine: Synthesizer) -> None:
    got_audio = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.synthesize(SynthesisRequest(LONG)):
            got_audio.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(10):
        await got_audio.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seconds(engine, await collect(engine, SENTENCE)) > 1.0


async def test_concurrent_requests_all_complete(engine: Synthesizer) -> None:
    texts = [f"Speaker {i} says hello to everyone here." for i in range(5)]
    results = await asyncio.gather(*(collect(engine, text, speaker=i) for i, text in enumerate(texts)))
    for chunks in results:
        assert seconds(engine, chunks) > 0.5


@pytest.mark.parametrize("text", ["", "   \n\t", "[whisper]", "<|speaker:2|> [laughs]  [sighs] ", "[]"])
async def test_nothing_to_say_yields_no_chunks(engine: Synthesizer, text: str) -> None:
    assert await collect(engine, text) == []


async def test_markup_and_voices_are_accepted(engine: Synthesizer) -> None:
    voices = {1: VoiceRef("alice", "reference transcript")}
    text = "Hi. <|speaker:1|>Hello [excited] there! <|speaker:0|>[whisper] bye."
    assert seconds(engine, await collect(engine, text, voices=voices)) > 0.5


async def test_max_frames_caps_the_audio(engine: Synthesizer) -> None:
    chunks = await collect(engine, LONG, sampling=Sampling(max_frames=3))
    assert 0 < sum(c.pcm.size for c in chunks) <= 3 * engine.info.sample_rate / 21.5 + 1
    assert seconds(engine, await collect(engine, SENTENCE)) > 1.0  # and the engine is free again


async def test_aclose_ends_streams_in_flight_and_refuses_new_ones(engine: Synthesizer) -> None:
    stream = engine.synthesize(SynthesisRequest(LONG))
    async with asyncio.timeout(10):
        await anext(stream)
        await engine.aclose()
        rest = [chunk async for chunk in stream]
    assert sum(c.pcm.size for c in rest) < 30 * engine.info.sample_rate  # ended early, LONG is longer
    assert engine.health() is not None
    with pytest.raises(EngineError):
        await collect(engine, SENTENCE)
    await engine.aclose()  # idempotent


@pytest.mark.parametrize("name", sorted(ENGINES))
async def test_unstarted_engine_is_unhealthy_and_refuses_requests(name: str) -> None:
    synth = make_engine(name, **ENGINES[name])
    assert synth.health() is not None
    with pytest.raises(EngineError):
        await collect(synth, SENTENCE)
    await synth.aclose()
