"""The Synthesizer contract, one suite parametrized over every engine:

- ``stub``, ``espeak`` (the built-in voice);
- ``s2pro``: S2 Pro on the torch scheduler, the tiny fixture checkpoint (tests/fixtures/s2pro-tiny), CPU;
- ``pool``: the worker pool over two real ``shoal worker`` processes (stub engine) on loopback;
- ``sglang-standin``: S2 Pro on the SGLang backend with ``sglang.Engine`` replaced by its CPU stand-in
  (``tests/engine/sglang/fakes.py``: the real synthesizer, request conversion, model core and codec);
- ``s2pro-cuda`` and ``sglang``: the same two backends on a GPU (marked ``gpu``; skipped without one, with the reason).

Engines with random weights (the S2 Pro ones) make noise of an even level and never end a turn by themselves
(``ignore_end``): the "varies like speech" check is theirs to skip, and their turn lengths come from the frame budget.
Each engine serves the whole module on one event loop (SGLang binds to the loop of its first request and takes
minutes to start); the last test closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import pytest_asyncio

from engine.base import AudioChunk, EngineError, Sampling, SynthesisRequest, Synthesizer, VoiceRef
from engine.registry import make_engine
from tests.engine.dualar import CODEC, MODEL_DIR

SENTENCE = "The quick brown fox jumps over the lazy dog."
LONG = " ".join(f"This is sentence number {i} of a long and winding reply." for i in range(40))
# S2 Pro with random weights: a turn is as long as its budget (3 frames a character + 16: SENTENCE is ~7 s)
S2PRO = dict(model=str(MODEL_DIR), codec=str(CODEC), ignore_end=True, frames_per_char=3.0, frame_budget_base=16)


@dataclass(frozen=True)
class Case:
    build: Callable[[object], Synthesizer]  # a new engine, not started, given what ``around`` yields
    cloning: bool = False
    speechlike: bool = True  # its level varies like speech (random weights: it does not)
    around: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
    marks: tuple[pytest.MarkDecorator, ...] = field(default_factory=tuple)


def _pool(workers: object) -> Synthesizer:
    from engine.pool import PoolConfig, PoolEngine, StaticMembers

    return PoolEngine(StaticMembers(w.member for w in workers),  # type: ignore[attr-defined]
                      PoolConfig(refresh_s=0.2, start_timeout_s=5, connect_timeout_s=2, down_s=5))


@contextlib.contextmanager
def _stub_workers() -> Iterator[object]:
    from tests.engine.stub_workers import running

    with running(["w0", "w1"]) as workers:
        yield workers


def _sglang_standin(_: object) -> Synthesizer:
    import torch

    from engine.dualar.codec import load_codec
    from engine.sglang import SGLangConfig, SGLangSynthesizer
    from tests.engine.sglang.fakes import shadow_launcher

    config = SGLangConfig(**S2PRO, max_running_requests=16, cuda_graph_max_bs=16, max_seq_len=4096)  # type: ignore[arg-type]
    return SGLangSynthesizer(config, codec=load_codec(CODEC, device="cpu", dtype=torch.float32),
                             launcher=shadow_launcher())


def _gpu(*, sglang: bool) -> tuple[pytest.MarkDecorator, ...]:
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if sglang:
        from engine.sglang import missing_requirements

        missing = missing_requirements()
    else:
        missing = [] if cuda else ["no CUDA GPU (torch.cuda.is_available() is false)"]
    return (pytest.mark.gpu, pytest.mark.skipif(bool(missing), reason="; ".join(missing)))


CASES: dict[str, Case] = {
    "stub": Case(lambda _: make_engine("stub", ttft_ms=5, frame_ms=1)),
    "espeak": Case(lambda _: make_engine("espeak", workers=2)),
    "s2pro": Case(lambda _: make_engine("s2pro", progress=False, **S2PRO), cloning=True, speechlike=False),
    "pool": Case(_pool, around=_stub_workers),
    "sglang-standin": Case(_sglang_standin, cloning=True, speechlike=False),
    "s2pro-cuda": Case(lambda _: make_engine("s2pro", device="cuda", dtype="bfloat16", progress=False, **S2PRO),
                       cloning=True, speechlike=False, marks=_gpu(sglang=False)),
    "sglang": Case(lambda _: make_engine("s2pro", backend="sglang", max_running_requests=16, cuda_graph_max_bs=16,
                                         max_seq_len=4096, mem_fraction_static=0.4, **S2PRO),
                   cloning=True, speechlike=False, marks=_gpu(sglang=True)),
}
PARAMS = [pytest.param(name, marks=case.marks) for name, case in CASES.items()]

pytestmark = pytest.mark.asyncio(loop_scope="module")


@contextlib.asynccontextmanager
async def engine_of(name: str, *, start: bool = True) -> AsyncIterator[Synthesizer]:
    case = CASES[name]
    with case.around() as resources:
        synth = case.build(resources)
        try:
            if start:
                await synth.start()
            yield synth
        finally:
            await synth.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PARAMS)
async def named(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Synthesizer]]:
    async with engine_of(request.param) as synth:
        yield request.param, synth


@pytest.fixture
def engine(named: tuple[str, Synthesizer]) -> Synthesizer:
    return named[1]


@pytest.fixture
def case(named: tuple[str, Synthesizer]) -> Case:
    return CASES[named[0]]


async def collect(synth: Synthesizer, text: str, **fields: object) -> list[AudioChunk]:
    async with asyncio.timeout(60):
        return [chunk async for chunk in synth.synthesize(SynthesisRequest(text, **fields))]  # type: ignore[arg-type]


def seconds(synth: Synthesizer, chunks: list[AudioChunk]) -> float:
    return sum(c.pcm.size for c in chunks) / synth.info.sample_rate


async def test_started_engine_is_a_healthy_synthesizer(engine: Synthesizer, case: Case) -> None:
    assert isinstance(engine, Synthesizer)
    assert engine.health() is None
    assert 8000 <= engine.info.sample_rate <= 48000
    assert engine.info.to_wire()["name"] == engine.info.name
    assert engine.info.cloning is case.cloning
    codes = await engine.encode_voice(np.zeros(engine.info.sample_rate, np.float32), engine.info.sample_rate, "hi")
    if case.cloning:  # one second of reference: about 21.5 frames of the 10 codebooks
        assert codes is not None and codes.dtype == np.int16 and codes.shape[0] == 10 and 21 <= codes.shape[1] <= 23
    else:
        assert codes is None


async def test_streams_non_silent_float32_audio_of_plausible_length(engine: Synthesizer, case: Case) -> None:
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
    if case.speechlike:
        chunk_levels = [float(np.sqrt(np.mean(c.pcm**2))) for c in chunks]
        assert max(chunk_levels) > 2 * min(chunk_levels)  # it varies, like speech


async def test_closing_mid_stream_releases_the_engine(engine: Synthesizer) -> None:
    stream = engine.synthesize(SynthesisRequest(LONG))
    async with asyncio.timeout(30):
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
    async with asyncio.timeout(30):
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


@pytest.mark.parametrize("name", PARAMS)
async def test_unstarted_engine_is_unhealthy_and_refuses_requests(name: str) -> None:
    async with engine_of(name, start=False) as synth:
        assert synth.health() is not None
        with pytest.raises(EngineError):
            await collect(synth, SENTENCE)


# last: it closes the module's engine
async def test_aclose_ends_streams_in_flight_and_refuses_new_ones(engine: Synthesizer) -> None:
    stream = engine.synthesize(SynthesisRequest(LONG))
    async with asyncio.timeout(30):
        await anext(stream)
        await engine.aclose()
        rest = [chunk async for chunk in stream]
    assert sum(c.pcm.size for c in rest) < 30 * engine.info.sample_rate  # ended early, LONG is longer
    assert engine.health() is not None
    with pytest.raises(EngineError):
        await collect(engine, SENTENCE)
    await engine.aclose()  # idempotent
