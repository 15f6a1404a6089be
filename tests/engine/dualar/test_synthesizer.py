"""S2 Pro behind the engine interface (tiny fixture checkpoint): streaming, exactness, cancel, cloning."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from engine.base import EngineError, PastTurn, Sampling, SynthesisRequest, VoiceRef
from engine.dualar.generate import generate
from engine.dualar.synthesizer import DualARConfig, DualARSynthesizer
from tests.engine.dualar import FIXTURES, MODEL_DIR

CODEC = FIXTURES / "codec" / "codec.pth"
GREEDY = Sampling(temperature=0.0, seed=0, max_frames=12)  # seeded: repetition-aware resampling draws


@pytest.fixture
async def engine():
    synth = DualARSynthesizer(DualARConfig(model=str(MODEL_DIR), codec=str(CODEC), progress=False))
    await synth.start()
    yield synth
    await synth.aclose()


async def collect(synth: DualARSynthesizer, request: SynthesisRequest):
    async with asyncio.timeout(60):
        return [c async for c in synth.synthesize(request)]


async def test_streams_first_frame_alone_then_growing_chunks_equal_to_whole_generation(engine) -> None:
    request = SynthesisRequest(text="Hi there.", sampling=GREEDY)
    chunks = await collect(engine, request)
    frames = [c.codes.shape[1] for c in chunks]
    assert frames == [1, 2, 4, 5]  # 12 frames: 1, 2, 4, then the rest
    codes = np.concatenate([c.codes for c in chunks], axis=1)
    prompt = engine._prompts.build_request(request)
    expected = generate(engine._model, prompt, GREEDY, generator=torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(codes, expected)
    # streamed decode equals a whole decode of the same codes
    pcm = np.concatenate([c.pcm for c in chunks])
    whole = engine._codec.decode(codes)
    assert pcm.shape == (12 * 2048,)
    np.testing.assert_allclose(pcm, whole, atol=2e-5)
    assert engine.info.sample_rate == 44100 and engine.info.cloning is True


async def test_seeded_sampling_is_reproducible_and_seeds_differ(engine) -> None:
    def req(seed: int) -> SynthesisRequest:
        return SynthesisRequest(text="Hello.", sampling=Sampling(temperature=0.8, seed=seed, max_frames=6))

    a = np.concatenate([c.codes for c in await collect(engine, req(1))], axis=1)
    b = np.concatenate([c.codes for c in await collect(engine, req(1))], axis=1)
    c = np.concatenate([c.codes for c in await collect(engine, req(2))], axis=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


async def test_history_and_voices_reach_the_prompt(engine) -> None:
    ref = VoiceRef(voice="v", text="Hello.", codes=np.ones((10, 5), np.int16))
    past = PastTurn(speaker=1, text="Earlier.", codes=np.full((10, 3), 2, np.int16))
    plain = engine._prompts.build_request(SynthesisRequest(text="Now."))
    rich = engine._prompts.build_request(SynthesisRequest(text="Now.", voices={0: ref}, history=[past]))
    assert rich.shape[1] > plain.shape[1] + 8
    chunks = await collect(engine, SynthesisRequest(text="Now.", voices={0: ref}, history=[past], sampling=GREEDY))
    assert sum(c.codes.shape[1] for c in chunks) == 12


async def test_closing_the_stream_cancels_generation_and_the_engine_stays_usable(engine) -> None:
    long = SynthesisRequest(text="Long.", sampling=Sampling(temperature=0.0, max_frames=2000))
    stream = engine.synthesize(long)
    first = await anext(stream)
    assert first.codes.shape[1] == 1
    t0 = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - t0 < 5
    chunks = await collect(engine, SynthesisRequest(text="Next.", sampling=GREEDY))
    assert sum(c.codes.shape[1] for c in chunks) == 12


async def test_a_consumer_that_stops_pulling_stops_generation(engine) -> None:
    calls = 0
    original = engine._decode

    def counting(decoder, frames):
        nonlocal calls
        calls += 1
        return original(decoder, frames)

    engine._decode = counting  # count decoded chunks (a probe, not a fake: the real decode still runs)
    stream = engine.synthesize(SynthesisRequest(text="x", sampling=Sampling(temperature=0.0, max_frames=2000)))
    await anext(stream)
    await asyncio.sleep(1.0)
    assert calls <= 1 + engine.config.queue_chunks + 1  # the one pulled, the queue, the one blocked in put
    await stream.aclose()


async def test_encode_voice_gives_codes_once(engine) -> None:
    rate = 44100
    t = np.arange(rate) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    codes = await engine.encode_voice(pcm, rate, "A tone.")
    assert codes.dtype == np.int16 and codes.shape == (10, int(np.ceil(rate / 2048)))
    codes16k = await engine.encode_voice(pcm[::2].copy(), 22050, "A tone.")
    assert codes16k.shape[1] == codes.shape[1]


async def test_a_prompt_beyond_the_context_is_an_engine_error() -> None:
    synth = DualARSynthesizer(DualARConfig(model=str(MODEL_DIR), codec=str(CODEC), max_seq_len=64, progress=False))
    await synth.start()
    try:
        with pytest.raises(EngineError, match="context"):
            await collect(synth, SynthesisRequest(text="word " * 40, sampling=GREEDY))
    finally:
        await synth.aclose()


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        DualARConfig(model="x", device="tpu")
    with pytest.raises(ValueError):
        DualARConfig(model="x", first_chunk_frames=9, max_chunk_frames=8)
    assert torch.get_default_dtype() == torch.float32


# ---- many streams on one model (the batching scheduler), the prefix cache, the context budget


async def test_concurrent_streams_share_the_model_and_each_equals_its_stream_alone(engine) -> None:
    texts = ["Hi there.", "A longer sentence to say.", "Third.", "<|speaker:1|>Fourth voice here."]
    requests = [SynthesisRequest(text=t, sampling=Sampling(temperature=0.0, seed=i, max_frames=6 + 2 * i))
                for i, t in enumerate(texts)]
    together = await asyncio.gather(*(collect(engine, r) for r in requests))
    assert engine.stats()["steps_total"] < sum(r.sampling.max_frames for r in requests)  # batched
    for request, chunks in zip(requests, together, strict=True):
        codes = np.concatenate([c.codes for c in chunks], axis=1)
        alone = generate(engine._model, engine.prompt(request), request.sampling,
                         generator=torch.Generator().manual_seed(request.sampling.seed)).numpy()
        np.testing.assert_array_equal(codes, alone)


async def test_the_next_turn_reuses_the_conversation_and_stats_say_so(engine) -> None:
    from engine.base import engine_stats

    ref = VoiceRef(voice="v", text="Hello.", codes=np.ones((10, 5), np.int16))
    first = SynthesisRequest(text="One.", voices={0: ref}, sampling=GREEDY)
    codes = np.concatenate([c.codes for c in await collect(engine, first)], axis=1)
    second = SynthesisRequest(text="Two.", speaker=1, voices={0: ref}, history=[PastTurn(0, "One.", codes)],
                              sampling=GREEDY)
    await collect(engine, second)
    stats = engine_stats(engine)
    assert stats["prefix_cache_hits_total"] == 1 and stats["prefix_cache_misses_total"] == 1
    assert stats["prefix_cache_tokens_reused_total"] == engine.prompt(first).shape[1] + 12 - 1
    assert stats["prefix_cache_bytes"] > 0 and stats["frames_total"] >= 24


async def test_the_prefix_cache_can_be_switched_off_and_changes_nothing_audible() -> None:
    synth = DualARSynthesizer(DualARConfig(model=str(MODEL_DIR), codec=str(CODEC), progress=False, prefix_cache=False))
    await synth.start()
    try:
        first = SynthesisRequest(text="One.", sampling=GREEDY)
        a = np.concatenate([c.codes for c in await collect(synth, first)], axis=1)
        second = SynthesisRequest(text="Two.", history=[PastTurn(0, "One.", a)], sampling=GREEDY)
        b = np.concatenate([c.codes for c in await collect(synth, second)], axis=1)
        assert "prefix_cache_hits_total" not in synth.stats()
        expected = generate(synth._model, synth.prompt(second), GREEDY, generator=torch.Generator().manual_seed(0))
        np.testing.assert_array_equal(b, expected.numpy())
    finally:
        await synth.aclose()


async def test_a_stalled_consumer_does_not_stall_other_streams(engine) -> None:
    decoded_on: set[str] = set()
    original = engine._decode

    def probe(decoder, frames):
        decoded_on.add(threading.current_thread().name)
        return original(decoder, frames)

    engine._decode = probe
    stalled = engine.synthesize(SynthesisRequest(text="x", sampling=Sampling(temperature=0.0, max_frames=2000)))
    await anext(stalled)  # then never pulled again: its sequence pauses at its buffer bound
    try:
        t0 = time.monotonic()
        chunks = await collect(engine, SynthesisRequest(text="Other.", sampling=GREEDY))
        assert sum(c.codes.shape[1] for c in chunks) == 12 and time.monotonic() - t0 < 30
        assert engine.stats()["batch_running"] == 1  # the stalled one, paused, holding its slot
    finally:
        await stalled.aclose()
    assert decoded_on and all(name.startswith("s2pro-decode") for name in decoded_on)  # off the scheduler thread


async def test_a_history_beyond_the_context_budget_is_dropped_oldest_first() -> None:
    synth = DualARSynthesizer(DualARConfig(model=str(MODEL_DIR), codec=str(CODEC), max_seq_len=256, progress=False))
    await synth.start()
    try:
        history = [PastTurn(i % 2, f"Turn number {i}.", np.full((10, 20), i, np.int16)) for i in range(12)]
        request = SynthesisRequest(text="Now.", history=history, sampling=GREEDY)
        prompt = synth.prompt(request)
        assert prompt.shape[1] < 256 and synth._prompts.build("Now.", history=history).shape[1] > 256
        assert sum(c.codes.shape[1] for c in await collect(synth, request)) == 12
    finally:
        await synth.aclose()
    with pytest.raises(ValueError):
        DualARConfig(model="x", max_seq_len=256, context_budget=256)
