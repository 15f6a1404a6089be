"""The S2 Pro front end shared by both backends: a long conversation is trimmed to the context budget the same way
whichever source makes the frames (torch scheduler, SGLang through its CPU stand-in)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

from engine.base import PastTurn, Sampling, SynthesisRequest
from engine.dualar.codec import load_codec
from engine.dualar.context import trim_history
from engine.dualar.frontend import FrontEndConfig, S2ProSynthesizer, frame_budget
from engine.dualar.synthesizer import DualARConfig, DualARSynthesizer
from engine.sglang import SGLangConfig, SGLangSynthesizer
from tests.engine.dualar import CODEC, MODEL_DIR
from tests.engine.sglang.fakes import shadow_launcher

CONTEXT, BUDGET, TURNS = 512, 160, 40


@pytest.fixture(params=["torch", "sglang-standin"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[S2ProSynthesizer]:
    synth: S2ProSynthesizer
    if request.param == "torch":
        synth = DualARSynthesizer(DualARConfig(model=str(MODEL_DIR), codec=str(CODEC), progress=False,
                                               max_seq_len=CONTEXT, context_budget=BUDGET, ignore_end=True))
    else:
        synth = SGLangSynthesizer(
            SGLangConfig(model=str(MODEL_DIR), codec=str(CODEC), max_seq_len=CONTEXT, context_budget=BUDGET,
                         ignore_end=True, first_chunk_frames=1, max_running_requests=4, cuda_graph_max_bs=4),
            codec=load_codec(CODEC, device="cpu", dtype=torch.float32), launcher=shadow_launcher())
    await synth.start()
    yield synth
    await synth.aclose()


def record_prompts(synth: S2ProSynthesizer) -> list[torch.Tensor]:
    """The prompts the frame source is given, in order."""
    seen: list[torch.Tensor] = []
    open_ = synth.source.open

    async def recording(prompt: torch.Tensor, sampling: Sampling, *, session: str | None):  # noqa: ANN202
        seen.append(prompt.clone())
        return await open_(prompt, sampling, session=session)

    synth.source.open = recording  # type: ignore[method-assign]
    return seen


def history_of(turns: int) -> list[PastTurn]:
    """A fixed conversation: two speakers, 12 frames of audio a turn (the same for every backend)."""
    return [PastTurn(i % 2, f"Line {i} of the talk.", np.full((10, 12), i % 60, np.int16)) for i in range(turns)]


async def test_forty_turns_are_trimmed_to_the_budget_the_same_way_for_every_source(engine: S2ProSynthesizer) -> None:
    prompts = record_prompts(engine)
    history = history_of(TURNS)
    for turn in range(TURNS):
        request = SynthesisRequest(history[turn].text, speaker=turn % 2, history=history[:turn],
                                   session="long-talk", sampling=Sampling(seed=turn, max_frames=2))
        async with asyncio.timeout(60):
            chunks = [c async for c in engine.synthesize(request)]
        assert sum(c.codes.shape[1] for c in chunks) == 2  # every turn fits: none "does not fit the context"
    builder = engine._prompts
    assert builder is not None and len(prompts) == TURNS
    lengths = [p.shape[1] for p in prompts]
    untrimmed = builder.build(history[-1].text, speaker=1, history=history[:-1]).shape[1]
    assert untrimmed > CONTEXT > max(lengths)  # without trimming the last turns would not fit
    for turn, prompt in enumerate(prompts):  # exactly the shared rule, whichever source got it
        kept = trim_history(builder, history[:turn], BUDGET)
        expected = builder.build(history[turn].text, speaker=turn % 2, history=kept)
        assert torch.equal(prompt, expected), turn
    drops = [t for t in range(1, TURNS) if lengths[t] < lengths[t - 1]]
    assert len(drops) >= 3  # dropped in large steps, not every turn: prompts between drops extend each other
    for a, b in zip(prompts, prompts[1:], strict=False):
        if b.shape[1] > a.shape[1]:
            assert torch.equal(b[:, : a.shape[1]], a)  # the next prompt extends this one: the prefix cache matches


async def test_both_sources_make_the_same_frame_budget_and_refuse_what_cannot_fit(engine: S2ProSynthesizer) -> None:
    text = "Short."
    request = SynthesisRequest(text, sampling=Sampling(seed=1, max_frames=2000))
    prompt = engine.prompt(request)
    guard = frame_budget(text, per_char=engine.front.frames_per_char, base=engine.front.frame_budget_base)
    assert engine.frames_for(request, prompt) == min(guard, CONTEXT - prompt.shape[1] - 1)
    huge = SynthesisRequest("x" * (CONTEXT * 2))
    with pytest.raises(Exception, match="does not fit the context"):
        [c async for c in engine.synthesize(huge)]


def test_the_front_end_settings_are_checked_once_for_both_backends() -> None:
    for make in (lambda **kw: DualARConfig(model="x", **kw), lambda **kw: SGLangConfig(model="x", **kw)):
        with pytest.raises(ValueError, match="frames_per_char"):
            make(frames_per_char=0)
        with pytest.raises(ValueError, match="queue_chunks"):
            make(queue_chunks=0)
    assert DualARConfig(model="x").front_end() == FrontEndConfig()
