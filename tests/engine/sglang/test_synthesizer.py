"""The SGLang synthesizer end to end: cache hits through the previous turn, keys that part at a residual code, abort,
seeds, chunking (the shared engine contract runs it too, in ``tests/engine/test_contract.py``).

Two engines run the same tests:

- ``fake`` (CPU, always): the real synthesizer, shadow checkpoint, request conversion, model core and streaming
  codec, with ``sglang.Engine`` replaced by an in-process stand-in (``fakes.FakeSGLangEngine``: continuous
  batching, a prefix cache keyed like SGLang's radix cache, per-token frame lists, abort);
- ``sglang`` (marked ``gpu``, skipped without a CUDA GPU and sglang): the real thing.

Each engine serves the whole module on one event loop (SGLang binds its tokenizer manager to the loop of its first
request, and takes a minute or two to start). The model is the tiny fixture checkpoint and never ends a turn by
itself (``ignore_end``): turn lengths come from the frames-per-character guard and ``max_frames``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio
import torch

from engine.base import PastTurn, Sampling, SynthesisRequest
from engine.dualar.codec import load_codec
from engine.sglang import SGLangConfig, SGLangSynthesizer, missing_requirements
from engine.sglang.convert import build_request
from engine.sglang.keys import shared_prefix_len
from tests.engine.dualar import FIXTURES, MODEL_DIR
from tests.engine.sglang.fakes import shadow_launcher

pytestmark = pytest.mark.asyncio(loop_scope="module")
_missing = missing_requirements()
ENGINES = [
    "fake",
    pytest.param("sglang", marks=[pytest.mark.gpu, pytest.mark.skipif(bool(_missing), reason="; ".join(_missing))]),
]


def config(**overrides: object) -> SGLangConfig:
    fields: dict = dict(ignore_end=True, frames_per_char=3.0, frame_budget_base=16, max_running_requests=16,
                        cuda_graph_max_bs=16, max_seq_len=4096, mem_fraction_static=0.4, first_chunk_frames=2)
    fields.update(model=str(MODEL_DIR), codec=str(FIXTURES / "codec" / "codec.pth"))
    fields.update(overrides)
    return SGLangConfig(**fields)


fake_launcher = shadow_launcher()  # the stand-in, from the same arguments SGLang gets


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ENGINES)
async def engine(request: pytest.FixtureRequest):
    if request.param == "fake":
        codec = load_codec(FIXTURES / "codec" / "codec.pth", device="cpu", dtype=torch.float32)
        synth = SGLangSynthesizer(config(), codec=codec, launcher=fake_launcher)
    else:
        synth = SGLangSynthesizer(config())
    await synth.start()
    yield synth
    await synth.aclose()


async def collect(synth: SGLangSynthesizer, request: SynthesisRequest) -> list:
    async with asyncio.timeout(180):
        return [chunk async for chunk in synth.synthesize(request)]


def codes_of(chunks: list) -> np.ndarray:
    return np.concatenate([c.codes for c in chunks], axis=1)


async def test_the_first_chunk_is_small_and_chunks_grow(engine: SGLangSynthesizer) -> None:
    chunks = await collect(engine, SynthesisRequest("A short sentence to speak.", sampling=Sampling(max_frames=40)))
    frames = [c.codes.shape[1] for c in chunks]
    assert 1 <= frames[0] <= 4 and sum(frames) == 40 and frames[-1] <= 16
    assert frames[:3] == sorted(frames[:3])
    assert all(c.pcm.dtype == np.float32 and c.pcm.size == 2048 * c.codes.shape[1] for c in chunks)


async def test_seeded_requests_repeat_and_seeds_differ(engine: SGLangSynthesizer) -> None:
    def request(seed: int) -> SynthesisRequest:
        return SynthesisRequest("Hello there.", sampling=Sampling(seed=seed, max_frames=12))

    a = codes_of(await collect(engine, request(1)))
    b = codes_of(await collect(engine, request(1)))
    c = codes_of(await collect(engine, request(2)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


async def test_the_next_turn_hits_the_cache_for_everything_through_this_turn(engine: SGLangSynthesizer) -> None:
    session = "cache-through-turn-1"
    first = SynthesisRequest("The first turn of the talk.", session=session, sampling=Sampling(seed=3, max_frames=20))
    codes = codes_of(await collect(engine, first))
    await engine.wait_warm()
    second = SynthesisRequest("And the second one.", session=session, history=[PastTurn(0, first.text, codes)],
                              sampling=Sampling(seed=4, max_frames=5))
    await collect(engine, second)
    prompts = engine._prompts
    through_turn1 = prompts.build_request(first).shape[1] + codes.shape[1] + prompts.text("<|im_end|>\n").shape[1]
    prompt_tokens, cached = engine.last_usage[session]
    assert prompt_tokens == prompts.build_request(second).shape[1]
    assert cached >= through_turn1 - 1, (cached, through_turn1)  # SGLang may keep the last matched position back
    assert engine.stats()["sglang_warmups_total"] >= 1


async def test_a_history_differing_in_one_residual_code_shares_nothing_from_that_frame(
    engine: SGLangSynthesizer,
) -> None:
    ids = engine._ids
    codes = np.random.default_rng(5).integers(0, ids.codebook_size, (10, 30)).astype(np.int16)
    other = codes.copy()
    other[7, 12] = (other[7, 12] + 1) % ids.codebook_size  # residual code 7 of frame 12, nothing else

    def request(history: np.ndarray, session: str) -> SynthesisRequest:
        return SynthesisRequest("Now say this.", session=session, history=[PastTurn(0, "Earlier words.", history)],
                                sampling=Sampling(seed=1, max_frames=3))

    await collect(engine, request(codes, "residual-a"))
    await engine.wait_warm()
    await collect(engine, request(other, "residual-b"))
    keys = [build_request(engine._prompts.build_request(request(h, "x")), Sampling(), ids).input_ids
            for h in (codes, other)]
    divergence = shared_prefix_len(*keys)
    _, cached = engine.last_usage["residual-b"]
    assert 0 < cached <= divergence  # reused up to the changed frame, never past it


async def test_a_closed_stream_is_aborted_and_frees_its_place(engine: SGLangSynthesizer) -> None:
    before = engine.stats().get("sglang_aborts_total", 0.0)
    stream = engine.synthesize(SynthesisRequest("This goes on and on. " * 50, sampling=Sampling(max_frames=2000)))
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.stats()["sglang_aborts_total"] == before + 1
    assert engine.stats()["sglang_requests_running"] == 0
    chunks = await collect(engine, SynthesisRequest("Next.", sampling=Sampling(max_frames=8)))
    assert codes_of(chunks).shape[1] == 8


async def test_stats_name_what_the_engine_did(engine: SGLangSynthesizer) -> None:
    stats = engine.stats()
    assert stats["sglang_requests_total"] > 0 and stats["sglang_frames_total"] > 0
    assert 0 < stats["sglang_cached_tokens_total"] <= stats["sglang_prompt_tokens_total"]

