"""One bad request fails one request: model-side failures never reach SGLang's scheduler (whose death would take
Shoal's process along), and Shoal's model package fails to import with its cause, not as "not registered"."""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.base import EngineError, Sampling, SynthesisRequest
from engine.dualar.codec import load_codec
from engine.dualar.config import load_config
from engine.dualar.loader import load_state_dict
from engine.dualar.prompt import PromptBuilder
from engine.sglang import SGLangConfig, SGLangSynthesizer
from engine.sglang.convert import FLAG_FAILED, TokenIds, build_request
from engine.sglang.core import without_custom_processor
from engine.sglang.synthesizer import register_model_package
from tests.engine.dualar import FIXTURES, MODEL_DIR
from tests.engine.sglang.fakes import MiniRunner, make_core, shadow_launcher



@pytest.fixture(scope="module")
def config():
    return load_config(MODEL_DIR)


@pytest.fixture(scope="module")
def prompts(config) -> PromptBuilder:  # noqa: ANN001
    return PromptBuilder.from_pretrained(MODEL_DIR, config)


async def collect(synth: SGLangSynthesizer, text: str, frames: int = 6) -> list:
    async with asyncio.timeout(60):
        return [c async for c in synth.synthesize(SynthesisRequest(text, sampling=Sampling(max_frames=frames)))]


async def test_a_model_exception_fails_one_request_and_the_next_succeeds() -> None:
    codec = load_codec(FIXTURES / "codec" / "codec.pth", device="cpu", dtype=torch.float32)
    config = SGLangConfig(model=str(MODEL_DIR), codec=str(FIXTURES / "codec" / "codec.pth"), ignore_end=True,
                          max_running_requests=4, cuda_graph_max_bs=4, max_seq_len=1024, warm_cache=False)
    synth = SGLangSynthesizer(config, codec=codec, launcher=shadow_launcher())
    await synth.start()
    try:
        core = synth._engine.core
        real_frame, calls = core._frame, []

        def fails_once(*args, **kwargs):  # the sample hook, a slot write, max rows: anything the model raises
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected model failure")
            return real_frame(*args, **kwargs)

        core._frame = fails_once
        with pytest.raises(EngineError, match="lost this request"):
            await collect(synth, "This one meets the failure.")
        chunks = await collect(synth, "This one is fine.")
        assert sum(c.codes.shape[1] for c in chunks) == 6
        assert synth.health() is None and synth._engine.crashed is None  # SGLang's scheduler lived on
    finally:
        await synth.aclose()


def test_a_slot_outside_the_model_fails_that_request_only(config, prompts) -> None:  # noqa: ANN001
    core = make_core(config, max_rows=4, max_slots=8)
    core.load_published(load_state_dict(MODEL_DIR, progress=False).items())
    ids = TokenIds.of(config)
    good = build_request(prompts.build_request(SynthesisRequest("Fine.")), Sampling(temperature=0.0, seed=0), ids)
    bad = build_request(prompts.build_request(SynthesisRequest("Lost.")), Sampling(temperature=0.0, seed=0), ids)
    frames = MiniRunner(core.eval()).extend([(3, good, 0, good.prompt_len), (99, bad, 0, bad.prompt_len)])
    assert not frames[0][-1] & FLAG_FAILED and frames[0][0] != config.im_end_id
    assert frames[1][-1] & FLAG_FAILED and frames[1][0] == config.im_end_id
    alone = MiniRunner(core).extend([(3, good, 0, good.prompt_len)])[0]
    np.testing.assert_array_equal(frames[0], alone)  # its neighbour's failure changed nothing


def test_the_head_rows_are_gathered_once_and_follow_new_weights(config) -> None:  # noqa: ANN001
    core = make_core(config)
    weights = load_state_dict(MODEL_DIR, progress=False)
    core.load_published(weights.items())
    torch.testing.assert_close(core.main_head, core.slow.head_weight()[core.main_ids])
    address = core.main_head.data_ptr()
    core.load_published({k: v * 2 for k, v in weights.items()}.items())
    torch.testing.assert_close(core.main_head, core.slow.head_weight()[core.main_ids])
    assert core.main_head.data_ptr() == address  # updated in place: a captured CUDA graph stays valid


def test_decode_passes_skip_the_custom_processor_and_leave_the_batch_alone() -> None:
    info = SimpleNamespace(has_custom_logit_processor=True, custom_logit_processor={1: "entry"}, custom_params=[{}])
    copy = without_custom_processor(info)
    assert copy is not info and not copy.has_custom_logit_processor and copy.custom_logit_processor is None
    assert info.has_custom_logit_processor and info.custom_logit_processor == {1: "entry"}
    plain = SimpleNamespace(has_custom_logit_processor=False)
    assert without_custom_processor(plain) is plain and without_custom_processor(None) is None


def test_an_import_error_in_the_model_package_names_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "sglang" or m.startswith(("sglang.", "engine.sglang.models"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sglang", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(EngineError) as caught:
        register_model_package()
    message = str(caught.value)
    assert "engine.sglang.models" in message and "sglang" in message and "ModuleNotFoundError" in message
    assert "unsupported architecture" in message  # says what SGLang would have said instead
    assert isinstance(caught.value.__cause__, ImportError)
