"""The stub engine: deterministic tones and codes at a GPU-like cadence."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from engine.base import AudioChunk, Sampling, SynthesisRequest, VoiceRef
from engine.registry import ENGINE_NAMES, make_engine
from engine.stub import FRAME_MS, StubConfig, StubSynthesizer


async def started(**options: object) -> StubSynthesizer:
    synth = StubSynthesizer(StubConfig(**options))  # type: ignore[arg-type]
    await synth.start()
    return synth


async def collect(synth: StubSynthesizer, text: str, **fields: object) -> list[AudioChunk]:
    async with asyncio.timeout(30):
        return [c async for c in synth.synthesize(SynthesisRequest(text, **fields))]  # type: ignore[arg-type]


def dominant_hz(chunks: list[AudioChunk], sample_rate: int) -> float:
    audio = np.concatenate([c.pcm for c in chunks])
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(audio.size, 1 / sample_rate)[np.argmax(spectrum)])


def test_info() -> None:
    info = StubSynthesizer().info
    assert (info.name, info.sample_rate, info.cloning) == ("stub", 44100, False)
    assert info.frame_ms == pytest.approx(1000 / 21.5)


@pytest.mark.parametrize(
    "options",
    [{"ttft_ms": -1}, {"frame_ms": -0.5}, {"frame_ms": 1e9}, {"ttft_ms": float("inf")}, {"ttft_ms": float("nan")},
     {"frame_ms": "12"}, {"ttft_ms": True}, {"sample_rate": 12345}, {"chars_per_frame": 0}],
)
def test_options_are_validated(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        StubConfig(**options)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_engine("stub", **options)


def test_registry_knows_both_engines_and_rejects_the_rest() -> None:
    assert set(ENGINE_NAMES) >= {"espeak", "stub"}
    assert isinstance(make_engine("stub", ttft_ms=0), StubSynthesizer)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("nope")
    with pytest.raises(ValueError, match="bad options"):
        make_engine("stub", no_such_option=1)


async def test_one_codec_frame_per_chunk_with_codes() -> None:
    synth = await started(ttft_ms=0, frame_ms=0)
    chunks = await collect(synth, "x" * 120)
    assert len(chunks) == 100  # ~ one frame per 1.2 characters
    for chunk in chunks:
        assert chunk.pcm.size == 2048  # 44.1 kHz / 21.53 frames per second
        assert chunk.codes is not None and chunk.codes.shape == (10, 1) and chunk.codes.dtype == np.int16
        assert 0 <= chunk.codes[0, 0] < 4096 and np.all((chunk.codes[1:] >= 0) & (chunk.codes[1:] < 1024))
    assert chunks[0].pcm.size / 44100 * 1000 == pytest.approx(FRAME_MS, rel=0.01)


async def test_markup_is_not_counted_and_short_pieces_get_a_frame() -> None:
    synth = await started(ttft_ms=0, frame_ms=0)
    assert len(await collect(synth, "a")) == 1
    assert len(await collect(synth, "a <|speaker:1|>b [whispering very softly indeed]")) == 2


async def test_max_frames_caps_the_output() -> None:
    synth = await started(ttft_ms=0, frame_ms=0)
    assert len(await collect(synth, "x" * 1000, sampling=Sampling(max_frames=7))) == 7


async def test_output_is_deterministic() -> None:
    synth = await started(ttft_ms=0, frame_ms=0)
    request = {"speaker": 1, "voices": {1: VoiceRef("v1", "")}}
    a, b = await collect(synth, "Same text.", **request), await collect(synth, "Same text.", **request)
    assert all(np.array_equal(x.pcm, y.pcm) and np.array_equal(x.codes, y.codes) for x, y in zip(a, b))  # type: ignore[arg-type]
    other = await collect(synth, "Other text.", **request)
    assert not np.array_equal(np.concatenate([c.codes for c in a]), np.concatenate([c.codes for c in other[:9]]))


async def test_pitch_depends_on_the_speaker() -> None:
    synth = await started(ttft_ms=0, frame_ms=0)
    text = "A sentence long enough for a clear pitch."
    pitches = {dominant_hz(await collect(synth, text, speaker=s), 44100) for s in range(3)}
    assert len(pitches) == 3


async def test_waits_ttft_then_frame_ms_per_frame() -> None:
    synth = await started(ttft_ms=60, frame_ms=15)
    start = time.perf_counter()
    stamps = []
    async for _ in synth.synthesize(SynthesisRequest("x" * 12)):  # 10 frames
        stamps.append(time.perf_counter() - start)
    assert len(stamps) == 10
    assert stamps[0] >= 0.055  # sleeps never end early (lower bounds only: no speed asserts)
    assert stamps[-1] - stamps[0] >= 9 * 0.015 * 0.9


async def test_pull_driven_it_makes_nothing_ahead_of_the_consumer() -> None:
    synth = await started(ttft_ms=0, frame_ms=1)
    stream = synth.synthesize(SynthesisRequest("x" * 120))
    await anext(stream)
    await asyncio.sleep(0.1)
    rest = [c async for c in stream]
    assert len(rest) == 99  # nothing was skipped or dropped while we were not pulling


async def test_cloning_option_encodes_voices_deterministically() -> None:
    synth = await started(cloning=True)
    assert synth.info.cloning
    pcm = np.sin(np.linspace(0, 1000, 16000 * 3)).astype(np.float32)
    codes = await synth.encode_voice(pcm, 16000, "transcript")
    assert codes is not None and codes.dtype == np.int16 and codes.shape == (10, math.ceil(3 * 21.5))
    again = await synth.encode_voice(pcm, 16000, "transcript")
    assert again is not None and np.array_equal(codes, again)


async def test_output_does_not_depend_on_earlier_requests() -> None:
    synth = make_engine("stub", ttft_ms=0, frame_ms=0)
    await synth.start()
    try:
        async def pcm(text: str) -> np.ndarray:
            return np.concatenate([c.pcm async for c in synth.synthesize(SynthesisRequest(text))])

        first = await pcm("Same words every time.")
        await pcm("Something else in between, quite a bit longer than before.")
        np.testing.assert_array_equal(await pcm("Same words every time."), first)
    finally:
        await synth.aclose()


async def test_shared_audio_and_codes_cannot_be_corrupted_by_a_consumer() -> None:
    """The stub's chunks are views of tables made once (so a load test measures the gateway, not the instrument):
    a consumer that writes to one gets an error, and the next equal request still gets the same audio."""
    synth = await started(ttft_ms=0, frame_ms=0)
    text = "A line long enough for a middle frame or two, not only the faded edges."
    first = await collect(synth, text)
    middle = first[len(first) // 2]
    with pytest.raises(ValueError, match="read-only"):
        middle.pcm[:10] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        middle.codes[0, 0] = 1
    again = await collect(synth, text)
    assert all(np.array_equal(x.pcm, y.pcm) and np.array_equal(x.codes, y.codes) for x, y in zip(first, again))
