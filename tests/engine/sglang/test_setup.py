"""Everything around the SGLang backend that runs without a GPU: the clear refusal, its config, the checkpoint SGLang
is pointed at, the random-weight presets, the pinned version and the model module SGLang imports."""

from __future__ import annotations

import ast
import asyncio
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from engine.base import EngineError, SynthesisRequest
from engine.dualar.config import ModelConfig
from engine.dualar.presets import PRESETS
from engine.dualar.prompt import load_tokenizer
from engine.sglang import SGLANG_VERSION, BackendUnavailable, SGLangConfig, SGLangSynthesizer
from engine.sglang.checkpoint import ARCHITECTURE, MODEL_PACKAGE, sglang_hf_config, write_shadow_checkpoint
from engine.sglang.guard import missing_requirements, require_sglang_backend
from engine.sglang.presets import byte_level_tokenizer, preset_raw_config
from engine.sglang.synthesizer import engine_kwargs
from tests.engine.dualar import MODEL_DIR

ROOT = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------------------ the refusal


def test_no_gpu_and_no_sglang_are_both_named() -> None:
    missing = missing_requirements(cuda=False, sglang_version=None)
    assert len(missing) == 2
    assert "no CUDA GPU" in missing[0] and "sglang is not installed" in missing[1]
    assert "pip install '.[sglang]'" in missing[1]
    with pytest.raises(BackendUnavailable) as info:
        require_sglang_backend(cuda=False, sglang_version=None)
    assert isinstance(info.value, EngineError)  # the CLI prints EngineErrors as one line and exits non-zero
    assert "no CUDA GPU" in str(info.value) and "sglang is not installed" in str(info.value)


def test_each_missing_piece_alone() -> None:
    assert missing_requirements(cuda=True, sglang_version=SGLANG_VERSION) == []
    only_gpu = missing_requirements(cuda=False, sglang_version=SGLANG_VERSION)
    assert len(only_gpu) == 1 and "CUDA" in only_gpu[0]
    only_sglang = missing_requirements(cuda=True, sglang_version=None)
    assert len(only_sglang) == 1 and "not installed" in only_sglang[0]
    wrong = missing_requirements(cuda=True, sglang_version="0.4.0")
    assert len(wrong) == 1 and f"sglang=={SGLANG_VERSION}" in wrong[0]


def test_on_this_machine_the_probe_finds_what_is_missing() -> None:
    import importlib.util

    import torch

    missing = missing_requirements()
    assert any("CUDA" in m for m in missing) == (not torch.cuda.is_available())
    assert any("not installed" in m for m in missing) == (importlib.util.find_spec("sglang") is None)


@pytest.mark.skipif(not missing_requirements(), reason="this machine can run the sglang backend")
async def test_the_synthesizer_refuses_to_start_and_says_why() -> None:
    synth = SGLangSynthesizer(SGLangConfig(preset="tiny"))
    assert synth.health() == "not started"
    with pytest.raises(BackendUnavailable, match="the sglang backend cannot start"):
        await synth.start()
    assert "cannot start" in (synth.health() or "")
    with pytest.raises(EngineError):
        async for _ in synth.synthesize(SynthesisRequest("Hello.")):
            pass
    with pytest.raises(BackendUnavailable):
        synth.load()  # the CLI's path: before serving
    await synth.aclose()
    await synth.aclose()  # idempotent
    assert synth.health() == "closed"


def test_the_pinned_version_is_the_one_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = project["optional-dependencies"]["sglang"]
    assert f"sglang=={SGLANG_VERSION}" in extra
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("gpu:") for m in markers["markers"])


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "fields",
    [{}, {"model": "x", "preset": "tiny"}, {"preset": "tiny", "first_chunk_frames": 5},
     {"preset": "tiny", "first_chunk_frames": 4, "max_chunk_frames": 2}, {"preset": "tiny", "attention_backend": "x"},
     {"preset": "tiny", "max_seq_len": 10}, {"preset": "tiny", "mem_fraction_static": 0.99},
     {"preset": "tiny", "dtype": "int8"}, {"preset": "tiny", "frames_per_char": 0}],
)
def test_bad_configs_are_value_errors(fields: dict) -> None:
    with pytest.raises(ValueError):
        SGLangConfig(**fields)


def test_engine_arguments(tmp_path: Path) -> None:
    config = SGLangConfig(preset="tiny", gpu=1, max_seq_len=2048, attention_backend="fa3")
    shadow = write_shadow_checkpoint(tmp_path / "ckpt", preset_raw_config("tiny"), source=None,
                                     context_length=config.max_seq_len, max_rows=config.max_rows,
                                     max_slots=config.max_slots)
    kwargs = engine_kwargs(config, shadow)
    assert kwargs["model_path"] == str(tmp_path / "ckpt") and kwargs["load_format"] == "dummy"
    assert kwargs["skip_tokenizer_init"] and kwargs["enable_custom_logit_processor"]
    assert kwargs["attention_backend"] == "fa3" and kwargs["tp_size"] == 1 and kwargs["base_gpu_id"] == 1
    assert kwargs["context_length"] == 2048 and kwargs["disable_prefill_cuda_graph"]
    assert "disable_radix_cache" not in kwargs and "disable_decode_cuda_graph" not in kwargs


# ------------------------------------------------------------------------------------------------ checkpoint


def test_the_shadow_checkpoint_links_the_weights_and_describes_the_slow_ar(tmp_path: Path) -> None:
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    shadow = write_shadow_checkpoint(tmp_path / "s", raw, source=MODEL_DIR, context_length=1 << 20, max_rows=40,
                                     max_slots=300)
    assert shadow.load_format == "auto" and shadow.context_length == 4096  # capped at the RoPE table
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    assert all((tmp_path / "s" / n).resolve() == (MODEL_DIR / n).resolve() for n in names[1:])
    hf = json.loads((tmp_path / "s" / "config.json").read_text())
    assert hf["architectures"] == [ARCHITECTURE] and hf["model_type"] == "qwen3"
    shape = (hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"])
    assert shape == (2, 4, 2, 16)
    assert hf["vocab_size"] == 336 and hf["eos_token_id"] == 258 and hf["max_position_embeddings"] == 4096
    assert ModelConfig.from_dict(hf["shoal_s2pro"]) == ModelConfig.from_dict(raw)  # what the model class reads
    assert hf["shoal_runtime"] == {"max_rows": 40, "max_slots": 300}
    # rewriting replaces the directory
    again = write_shadow_checkpoint(tmp_path / "s", raw, source=None, context_length=512, max_rows=8, max_slots=8)
    assert again.load_format == "dummy" and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json"]


def test_the_real_shapes_fit_sglangs_kv_cache_description() -> None:
    hf = sglang_hf_config(PRESETS["s2pro"], context_length=8192, max_rows=72, max_slots=320)
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_key_value_heads"], hf["head_dim"]) == (2560, 36, 8, 128)
    assert hf["vocab_size"] == 155776 and hf["tie_word_embeddings"] is True


def test_checkpoints_sglang_cannot_serve_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pth").mkdir()
    (tmp_path / "pth" / "model.pth").write_bytes(b"")
    with pytest.raises(EngineError, match="safetensors only"):
        write_shadow_checkpoint(tmp_path / "a", PRESETS["tiny"], source=tmp_path / "pth", context_length=64,
                                max_rows=8, max_slots=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="no weights"):
        write_shadow_checkpoint(tmp_path / "b", PRESETS["tiny"], source=tmp_path / "empty", context_length=64,
                                max_rows=8, max_slots=8)
    with pytest.raises(EngineError, match="cannot serve"):
        write_shadow_checkpoint(tmp_path / "c", {"model_type": "llama"}, source=None, context_length=64, max_rows=8,
                                max_slots=8)


def test_the_model_module_sglang_imports_names_the_architecture() -> None:
    """SGLang registers ``EntryClass`` by class name; the shadow config must name that class."""
    package = ROOT / Path(*MODEL_PACKAGE.split("."))
    tree = ast.parse((package / "shoal_s2pro.py").read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    entry = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "EntryClass")
    assert isinstance(entry.value, ast.Name) and entry.value.id == ARCHITECTURE and ARCHITECTURE in classes
    methods = {f.name for f in classes[ARCHITECTURE].body if isinstance(f, ast.FunctionDef)}
    assert {"forward", "load_weights", "post_load_weights", "prepare_for_forward"} <= methods


# ------------------------------------------------------------------------------------------------ presets


def test_the_byte_level_tokenizer_matches_the_fixtures() -> None:
    ours, theirs = byte_level_tokenizer(64), load_tokenizer(MODEL_DIR)
    for text in ["<|im_start|>user\n<|speaker:0|>Héllo, wörld! 123<|im_end|>\n", "<|semantic:5|>[whisper] ok",
                 "<|im_start|>assistant\n<|voice|>"]:
        assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False).ids
    assert ours.token_to_id("<|semantic:0|>") == 268 and ours.token_to_id("<|im_end|>") == 258


def test_the_s2pro_preset_tokenizer_covers_its_semantic_range() -> None:
    tokenizer = byte_level_tokenizer(4096)
    config = ModelConfig.from_dict(preset_raw_config("s2pro"))
    assert tokenizer.token_to_id("<|semantic:4095|>") == config.semantic_end_id
    assert tokenizer.token_to_id("<|im_end|>") == config.im_end_id
    with pytest.raises(ValueError):
        preset_raw_config("huge")


def test_a_random_codec_of_the_tiny_shapes_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.dualar import codec as codec_module
    from engine.sglang.presets import random_codec

    monkeypatch.setattr(codec_module.CodecConfig, "s2pro", classmethod(lambda cls: cls.tiny()))
    codec = random_codec("cpu")
    pcm = codec.stream().decode(np.zeros((10, 3), dtype=np.int16))
    assert pcm.shape == (3 * 2048,) and np.isfinite(pcm).all()


def test_nothing_to_say_is_checked_before_anything_else() -> None:
    synth = SGLangSynthesizer(SGLangConfig(preset="tiny"))

    async def run() -> list:
        return [c async for c in synth.synthesize(SynthesisRequest("[whisper]"))]

    with pytest.raises(EngineError, match="unavailable"):  # not started: refused, even with nothing to say
        asyncio.run(run())


class _Codec:
    """Just what the synthesizer asks of a codec."""

    sample_rate, frame_samples = 44100, 2048

    def stream(self):
        return self

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.zeros(codes.shape[1] * 2048, np.float32)


class _RefusingEngine:
    """An engine that turns every request down, the way SGLang's tokenizer manager raises for a bad request."""

    def __init__(self) -> None:
        self.tokenizer_manager = self
        self.kwargs: dict = {}

    async def async_generate(self, **kwargs):
        raise ValueError("The input (5000 tokens) is longer than the model's context length (4096 tokens).")

    def abort_request(self, rid: str = "") -> None:
        pass

    def get_all_child_pids(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        pass


async def test_a_request_sglang_refuses_is_an_engine_error(tmp_path: Path) -> None:
    engine = _RefusingEngine()

    def launch(kwargs: dict) -> _RefusingEngine:
        engine.kwargs = kwargs
        return engine

    synth = SGLangSynthesizer(SGLangConfig(preset="tiny", work_dir=str(tmp_path)), codec=_Codec(), launcher=launch)
    await synth.start()  # no GPU needed with a launcher of one's own
    assert synth.health() is None
    assert engine.kwargs["load_format"] == "dummy" and (tmp_path / "sglang-checkpoint" / "config.json").is_file()
    with pytest.raises(EngineError, match="longer than the model's context length"):
        async for _ in synth.synthesize(SynthesisRequest("Hello.")):
            pass
    assert synth.stats()["sglang_requests_running"] == 0
    await synth.aclose()
    assert (tmp_path / "sglang-checkpoint").exists()  # a work_dir given is left in place
