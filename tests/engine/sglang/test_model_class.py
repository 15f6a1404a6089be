"""The SGLang model class itself (``engine.sglang.models.shoal_s2pro``), imported on the CPU against stand-ins for
the few SGLang modules it uses, driven the way SGLang's model runner drives it: construct from the HF config of the
shadow checkpoint, ``load_weights`` with checkpoint names, then per pass ``prepare_for_forward``, ``forward``, and
the hook after ``ModelRunner.sample`` that attaches the frames. It reproduces the reference greedy generation."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import sys
import types
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.base import Sampling
from engine.dualar.config import load_config
from engine.dualar.loader import load_state_dict
from engine.sglang.checkpoint import ARCHITECTURE, sglang_hf_config
from engine.sglang.convert import FRAME_KEY, TokenIds, build_request
from tests.engine.dualar import MODEL_DIR, golden
from tests.engine.sglang.fakes import FakeRadixAttention, KVPool



def _stub_sglang() -> dict[str, types.ModuleType]:
    """Just the names the model module imports from sglang, with the behaviour it relies on."""

    @dataclasses.dataclass
    class LogitsProcessorOutput:
        next_token_logits: torch.Tensor | None
        hidden_states: torch.Tensor | None = None
        customized_info: dict | None = None

    class RadixAttention(FakeRadixAttention):
        def __init__(self, num_heads, head_dim, scaling, num_kv_heads, layer_id, prefix=""):  # noqa: ANN001
            assert scaling == head_dim**-0.5
            super().__init__(layer_id, num_heads, num_kv_heads, head_dim)

    class CustomLogitProcessor:
        @classmethod
        def to_str(cls) -> str:
            return json.dumps({"callable": f"{cls.__module__}.{cls.__qualname__}"})

    class HookType(enum.Enum):
        AFTER = "after"

    class HookRegistry:
        _hooks: dict = {}
        _patched: set = set()

        @classmethod
        def register(cls, target, hook, hook_type):  # noqa: ANN001
            cls._hooks.setdefault(target, []).append((hook_type, hook, None))

        @classmethod
        def apply_hooks(cls) -> None:
            cls._patched.update(cls._hooks)

    modules = {name: types.ModuleType(name) for name in (
        "sglang", "sglang.srt", "sglang.srt.layers", "sglang.srt.layers.logits_processor",
        "sglang.srt.layers.radix_attention", "sglang.srt.sampling", "sglang.srt.sampling.custom_logit_processor",
        "sglang.srt.plugins", "sglang.srt.plugins.hook_registry")}
    modules["sglang.srt.layers.logits_processor"].LogitsProcessorOutput = LogitsProcessorOutput
    modules["sglang.srt.layers.radix_attention"].RadixAttention = RadixAttention
    modules["sglang.srt.sampling.custom_logit_processor"].CustomLogitProcessor = CustomLogitProcessor
    modules["sglang.srt.plugins.hook_registry"].HookRegistry = HookRegistry
    modules["sglang.srt.plugins.hook_registry"].HookType = HookType
    return modules


@pytest.fixture
def model_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    for name, module in _stub_sglang().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "engine.sglang.models.shoal_s2pro", raising=False)
    yield importlib.import_module("engine.sglang.models.shoal_s2pro")
    sys.modules.pop("engine.sglang.models.shoal_s2pro", None)


class Mode(enum.Enum):
    EXTEND = 1
    DECODE = 2

    def is_idle(self) -> bool:
        return False

    def is_decode(self) -> bool:
        return self is Mode.DECODE


def forward_batch(pool: KVPool, mode: Mode, slots: list[int], starts: list[int], lens: list[int],
                  custom: list | None = None, rids: list[str] | None = None) -> SimpleNamespace:
    """The ForwardBatch fields the model reads, plus what the stand-in attention needs."""
    return SimpleNamespace(
        forward_mode=mode, batch_size=len(slots), req_pool_indices=torch.tensor(slots),
        req_pool_indices_cpu=torch.tensor(slots), extend_prefix_lens_cpu=starts if mode is Mode.EXTEND else None,
        extend_seq_lens=torch.tensor(lens), extend_seq_lens_cpu=lens if mode is Mode.EXTEND else None, rids=rids,
        sampling_info=SimpleNamespace(custom_params=custom), pool=pool, slots=slots, starts=starts, lens=lens,
    )


def test_the_model_class_generates_the_reference_frames_as_sglang_drives_it(model_module: types.ModuleType) -> None:
    config = load_config(MODEL_DIR)
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    hf = SimpleNamespace(**sglang_hf_config(raw, context_length=4096, max_rows=8, max_slots=32))
    assert model_module.EntryClass.__name__ == ARCHITECTURE == hf.architectures[0]
    model = model_module.EntryClass(config=hf, quant_config=None)
    model.load_weights(iter(load_state_dict(MODEL_DIR, progress=False).items()))
    model.eval()
    assert model_module.install_sample_hook.__module__ == model_module.__name__
    registry = sys.modules["sglang.srt.plugins.hook_registry"].HookRegistry
    (_, hook, _), = registry._hooks["sglang.srt.model_executor.model_runner.ModelRunner.sample"]
    runner = SimpleNamespace(model=model)

    request = build_request(torch.from_numpy(golden("c")["prompt"]), Sampling(temperature=0.0, seed=0),
                            TokenIds.of(config), rid="r1")
    n, pool, rows = request.prompt_len, KVPool(), []
    ids, positions = request.input_ids, list(range(n))  # the prefill, then one token per decode step
    with torch.inference_mode():
        batch = forward_batch(pool, Mode.EXTEND, [5], [0], [n], [request.sampling_params["custom_params"]], ["r1"])
        for step in range(9):
            model.prepare_for_forward(batch)
            out = model.forward(torch.tensor(ids), torch.tensor(positions), batch)
            main = int(out.next_token_logits.argmax(-1)[0])  # SGLang's greedy sampler over the one-hot logits
            assert hook(torch.tensor([main]), runner, out, batch) is None  # keeps SGLang's sampled ids
            frame = out.customized_info[FRAME_KEY][0].copy()
            assert frame[0] == main
            rows.append(frame)
            batch = forward_batch(pool, Mode.DECODE, [5], [n + step], [1])
            ids, positions = [main], [n + step]
    np.testing.assert_array_equal(np.stack(rows)[:, :-1].T, golden("c")["generated"])
    assert model.get_input_embeddings() is model.slow.embeddings
    assert model_module.ShoalPassthrough()(torch.ones(2, 3)).sum() == 6  # leaves the logits alone


def test_the_model_class_wants_the_shadow_config(model_module: types.ModuleType) -> None:
    with pytest.raises(ValueError, match="shoal_s2pro"):
        model_module.EntryClass(config=SimpleNamespace(architectures=[ARCHITECTURE]))
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    hf = SimpleNamespace(**sglang_hf_config(raw, context_length=64, max_rows=2, max_slots=4))
    with pytest.raises(ValueError, match="quantization"):
        model_module.EntryClass(config=hf, quant_config=object())


def test_decode_passes_drop_the_processor_and_a_failing_hook_does_not_raise(model_module: types.ModuleType) -> None:
    config = load_config(MODEL_DIR)
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    hf = SimpleNamespace(**sglang_hf_config(raw, context_length=256, max_rows=4, max_slots=8))
    model = model_module.EntryClass(config=hf, quant_config=None)
    model.load_weights(iter(load_state_dict(MODEL_DIR, progress=False).items()))
    registry = sys.modules["sglang.srt.plugins.hook_registry"].HookRegistry
    (_, hook, _), = registry._hooks["sglang.srt.model_executor.model_runner.ModelRunner.sample"]

    batch = forward_batch(KVPool(), Mode.DECODE, [2], [10], [1])
    shared = SimpleNamespace(has_custom_logit_processor=True, custom_logit_processor={7: "entry"}, custom_params=[{}])
    batch.sampling_info = shared
    model.prepare_for_forward(batch)
    assert batch.sampling_info is not shared and not batch.sampling_info.has_custom_logit_processor
    assert shared.has_custom_logit_processor  # the running batch's own object is untouched

    broken = SimpleNamespace(forward_mode=Mode.DECODE, batch_size="not a number")  # the attach step raises
    out = SimpleNamespace(customized_info=None)
    assert hook(torch.tensor([1]), SimpleNamespace(model=model), out, broken) is None  # logged, not raised
