"""The checkpoint directory SGLang is pointed at: a config it can read, and the S2 Pro weights by link.

SGLang reads ``config.json`` with ``transformers.AutoConfig``, which does not know ``fish_qwen3_omni``. So the
backend writes a *shadow* directory (never touching the user's checkpoint):

- ``config.json`` shaped like a Qwen3 config for the slow AR (layers, heads, kv heads, head dim, vocabulary,
  context), which is all SGLang needs to size its paged KV cache, with ``architectures`` naming Shoal's model
  class and the untouched S2 Pro config under ``shoal_s2pro`` (plus the buffer sizes under ``shoal_runtime``),
  read back by that class on the GPU worker;
- symbolic links to the weight files (sharded safetensors with their index, or one ``model.safetensors``); for a
  preset with random weights there are none and SGLang is started with ``load_format="dummy"``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.base import EngineError
from engine.dualar.config import ModelConfig

__all__ = ["ARCHITECTURE", "MODEL_PACKAGE", "ShadowCheckpoint", "sglang_hf_config", "write_shadow_checkpoint"]

ARCHITECTURE = "ShoalS2ProForCausalLM"  # the EntryClass of engine.sglang.models.shoal_s2pro
MODEL_PACKAGE = "engine.sglang.models"  # what SGLANG_EXTERNAL_MODEL_PACKAGE names


@dataclass(frozen=True)
class ShadowCheckpoint:
    path: Path
    config: ModelConfig
    load_format: str  # "auto" (linked safetensors) or "dummy" (random weights)
    context_length: int  # positions SGLang serves per request (prompt + generated)


def sglang_hf_config(
    raw: Mapping[str, Any], *, context_length: int, max_rows: int, max_slots: int
) -> dict[str, Any]:
    """The ``config.json`` SGLang reads, for the S2 Pro ``config.json`` document ``raw``."""
    config = ModelConfig.from_dict(raw)  # ValueError for anything the engine cannot run
    slow = config.slow
    if not 0 < context_length <= slow.max_seq_len:
        raise ValueError(f"context length {context_length} must be within [1, {slow.max_seq_len}] (the RoPE table)")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",  # a type transformers parses; the fields below describe the slow AR
        "hidden_size": slow.dim,
        "intermediate_size": slow.intermediate_size,
        "num_hidden_layers": slow.n_layer,
        "num_attention_heads": slow.n_head,
        "num_key_value_heads": slow.n_local_heads,
        "head_dim": slow.head_dim,
        "vocab_size": slow.vocab_size,
        "max_position_embeddings": context_length,
        "rms_norm_eps": slow.norm_eps,
        "rope_theta": slow.rope_base,
        "attention_bias": False,
        "tie_word_embeddings": slow.tie_word_embeddings,
        "eos_token_id": config.im_end_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "shoal_s2pro": dict(raw),
        "shoal_runtime": {"max_rows": max_rows, "max_slots": max_slots},
    }


def _weight_files(source: Path) -> list[Path]:
    index, single = source / "model.safetensors.index.json", source / "model.safetensors"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"{index} is not a safetensors index with a weight_map: {exc}") from exc
        missing = [name for name in shards if not (source / name).is_file()]
        if missing:
            raise EngineError(f"{index.name} names shard(s) missing from {source}: {', '.join(missing)}")
        return [index, *(source / name for name in shards)]
    if single.is_file():
        return [single]
    if (source / "model.pth").is_file():
        raise EngineError(
            f"{source} holds model.pth; the sglang backend loads safetensors only. Convert it once with the torch "
            "backend (engine.dualar.loader.to_published + safetensors.torch.save_file) or use --backend torch"
        )
    raise EngineError(f"no weights in {source}: expected model.safetensors.index.json or model.safetensors")


def write_shadow_checkpoint(
    dest: str | Path,
    raw_config: Mapping[str, Any],
    *,
    source: str | Path | None,
    context_length: int,
    max_rows: int,
    max_slots: int,
) -> ShadowCheckpoint:
    """Write the shadow directory ``dest`` (created, or emptied first). ``source`` None: random weights.

    ``context_length`` is capped at the slow AR's RoPE table (``text_config.max_seq_len``).
    """
    dest = Path(dest)
    try:
        context_length = min(context_length, ModelConfig.from_dict(raw_config).slow.max_seq_len)
        hf_config = sglang_hf_config(raw_config, context_length=context_length, max_rows=max_rows, max_slots=max_slots)
    except ValueError as exc:
        raise EngineError(f"cannot serve this checkpoint with SGLang: {exc}") from None
    files = _weight_files(Path(source)) if source is not None else []
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    for file in files:
        (dest / file.name).symlink_to(file.resolve())
    return ShadowCheckpoint(dest, ModelConfig.from_dict(raw_config), "auto" if files else "dummy", context_length)
