"""Loading checkpoints: the three weight layouts, and a clear error for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.dualar.config import ModelConfig, load_config
from engine.dualar.loader import (
    ModelLoadError,
    load_model,
    load_state_dict,
    resolve_model_path,
    to_published,
)
from tests.engine.dualar import MODEL_DIR



@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_state_dict(MODEL_DIR, progress=False)


def _checkpoint(tmp_path: Path, weights: dict[str, torch.Tensor], layout: str = "single") -> Path:
    """A checkpoint dir in tmp_path with the fixture's config and the given tensors."""
    shutil.copy(MODEL_DIR / "config.json", tmp_path / "config.json")
    if layout == "single":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    elif layout == "pth":
        torch.save(dict(weights), tmp_path / "model.pth")
    elif layout == "pth-wrapped":
        torch.save({"state_dict": dict(weights)}, tmp_path / "model.pth")
    return tmp_path


def _assert_same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    published = to_published(model)  # type: ignore[arg-type]
    assert published.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(published[key], tensor), key


def test_sharded_checkpoint_loads_every_tensor(
    weights: dict[str, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_model(MODEL_DIR, dtype="float32", progress=True)
    _assert_same_weights(model, weights)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    captured = capsys.readouterr()
    assert "Loading weights" in captured.err and captured.out == ""


def test_progress_bar_can_be_disabled(capsys: pytest.CaptureFixture[str]) -> None:
    load_model(MODEL_DIR, dtype="float32", progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("layout", ["single", "pth", "pth-wrapped"])
def test_single_file_layouts(tmp_path: Path, weights: dict[str, torch.Tensor], layout: str) -> None:
    model = load_model(_checkpoint(tmp_path, weights, layout), dtype=torch.float32, progress=False)
    _assert_same_weights(model, weights)


def test_dtype_option(weights: dict[str, torch.Tensor]) -> None:
    model = load_model(MODEL_DIR, dtype="bfloat16", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    key = "text_model.model.embeddings.weight"
    assert torch.equal(to_published(model)[key], weights[key].to(torch.bfloat16))


def test_bad_dtype_or_device_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_model(MODEL_DIR, dtype="float16", progress=False)
    with pytest.raises(ValueError, match="device"):
        load_model(MODEL_DIR, device="mps", progress=False)


def test_missing_key_is_listed(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in weights.items() if k != "text_model.model.layers.1.attention.wqkv.weight"}
    with pytest.raises(ModelLoadError, match=r"missing keys \(1\): text_model.model.layers.1.attention.wqkv.weight"):
        load_model(_checkpoint(tmp_path, partial), progress=False)


def test_unexpected_key_is_listed(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    extra = dict(weights, **{"audio_decoder.layers.1.ffn_norm.weight": torch.ones(64)})
    with pytest.raises(ModelLoadError, match=r"unexpected keys \(1\): audio_decoder.layers.1.ffn_norm.weight"):
        load_model(_checkpoint(tmp_path, extra), progress=False)


def test_shape_mismatch_is_listed(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    bad = dict(weights, **{"audio_decoder.output.weight": torch.zeros(32, 64)})
    with pytest.raises(
        ModelLoadError, match=r"shape mismatches \(1\): audio_decoder.output.weight \[32, 64\] != expected \[64, 64\]"
    ):
        load_model(_checkpoint(tmp_path, bad), progress=False)


def test_all_problems_are_reported_at_once(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    bad = {k: v for k, v in weights.items() if k != "audio_decoder.norm.weight"}
    bad["text_model.model.output.weight"] = torch.zeros(336, 64)
    bad["text_model.model.norm.weight"] = torch.zeros(65)
    with pytest.raises(ModelLoadError) as info:
        load_model(_checkpoint(tmp_path, bad), progress=False)
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message and "shape mismatches" in message


def test_wrong_model_type(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    path = _checkpoint(tmp_path, weights)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "qwen3"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model_type is 'qwen3', expected 'fish_qwen3_omni'"):
        load_model(path, progress=False)


def test_no_weights_and_missing_shard(tmp_path: Path) -> None:
    shutil.copy(MODEL_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no weights in"):
        load_model(tmp_path, progress=False)
    shutil.copy(MODEL_DIR / "model.safetensors.index.json", tmp_path / "model.safetensors.index.json")
    shutil.copy(MODEL_DIR / "model-00001-of-00002.safetensors", tmp_path)
    with pytest.raises(ModelLoadError, match="missing from .*model-00002-of-00002.safetensors"):
        load_model(tmp_path, progress=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere", progress=False)


def _config_dict() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


def test_config_parses_the_fixture() -> None:
    config = load_config(MODEL_DIR)
    assert (config.slow.dim, config.slow.n_layer, config.slow.n_local_heads, config.slow.qk_norm) == (64, 2, 2, True)
    assert (config.fast.n_layer, config.fast.qk_norm, config.codebook_size, config.num_codebooks) == (1, False, 64, 10)
    assert (config.semantic_begin_id, config.semantic_end_id, config.im_end_id) == (268, 331, 258)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("text_config"), "missing required field.*text_config"),
        (lambda c: c["text_config"].pop("dim"), "text_config is missing required field.*dim"),
        (lambda c: c["audio_decoder_config"].pop("num_codebooks"), "audio_decoder_config is missing.*num_codebooks"),
        (lambda c: c.pop("eos_token_id"), "missing required field.*eos_token_id"),
        (lambda c: c["text_config"].update(attention_qkv_bias=True), "attention_qkv_bias is true: not supported"),
        (lambda c: c["text_config"].update(n_local_heads=3), "multiple of n_local_heads"),
        (lambda c: c["text_config"].update(n_layer="2"), "n_layer must be a positive integer"),
        (lambda c: c.update(semantic_end_token_id=300), "33 semantic tokens but a codebook of 64"),
        (lambda c: c["audio_decoder_config"].update(dim=32), "projection between the stacks is not supported"),
    ],
)
def test_config_errors_are_value_errors_that_say_what(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    config = _config_dict()
    edit(config)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(config)


def test_resolve_local_directory_and_bad_path(tmp_path: Path) -> None:
    assert resolve_model_path(MODEL_DIR) == MODEL_DIR
    assert resolve_model_path(str(MODEL_DIR)) == MODEL_DIR
    with pytest.raises(ModelLoadError, match="neither a model directory nor a Hugging Face repo id"):
        resolve_model_path(tmp_path / "missing" / "dir")


def test_resolve_repo_id_downloads_through_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    calls: list[dict] = []

    def fake_download(**kwargs: object) -> str:  # a fake hub: no network in tests
        calls.append(kwargs)
        if kwargs["repo_id"] == "fishaudio/s2-pro":
            return str(tmp_path)
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_path("fishaudio/s2-pro", local_files_only=True) == tmp_path
    assert calls[0]["local_files_only"] is True
    with pytest.raises(ModelLoadError, match="cannot download 'nobody/nothing'.*LocalEntryNotFoundError: offline"):
        resolve_model_path("nobody/nothing")


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.unlink()  # copies of the read-only fixture files stay read-only; a new file is writable
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("keep", [0.5, 0.999, 5], ids=["half", "last-byte-missing", "header-cut"])
def test_truncated_shard_names_the_file(tmp_path: Path, keep: float) -> None:
    """An interrupted download: the shard exists but is cut short. One ModelLoadError naming that shard."""
    for file in MODEL_DIR.iterdir():
        shutil.copy(file, tmp_path / file.name)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    size = shard.stat().st_size
    _truncate(shard, int(size * keep) if keep < 1 else int(keep))
    with pytest.raises(ModelLoadError, match=r"cannot read .*model-00002-of-00002\.safetensors: .*header") as info:
        load_model(tmp_path, dtype="float32", progress=False)
    assert "model-00001" not in str(info.value)  # the intact shard is not blamed


@pytest.mark.parametrize("layout", ["single", "pth"])
def test_truncated_single_file_is_a_load_error(tmp_path: Path, weights: dict[str, torch.Tensor], layout: str) -> None:
    path = _checkpoint(tmp_path, weights, layout)
    file = path / ("model.safetensors" if layout == "single" else "model.pth")
    _truncate(file, file.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match=rf"cannot read .*{file.name}"):
        load_model(path, dtype="float32", progress=False)
