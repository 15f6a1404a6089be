"""The S2 Pro dual-AR configuration, parsed from a checkpoint's ``config.json`` (``model_type: fish_qwen3_omni``).

Three frozen dataclasses: :class:`SlowARConfig` (``text_config``), :class:`FastARConfig` (``audio_decoder_config``)
and :class:`ModelConfig` (both, plus the token ids). Parsing follows the reference loader: a field the reference
defaults is defaulted the same way, the fast AR inherits what its section leaves out from the slow AR, and it always
uses the slow AR's ``rope_base`` and ``norm_eps`` (the reference ignores the fast section's). Anything this engine
cannot run (biases, MoE, a projection between the two stacks) is a ValueError, as is a missing or ill-typed field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FastARConfig", "ModelConfig", "SlowARConfig", "load_config"]

MODEL_TYPE = "fish_qwen3_omni"


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_float(value: object, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _token_id(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class _StackConfig:
    """One transformer stack: pre-norm blocks, fused wqkv, GQA, interleaved RoPE, SwiGLU."""

    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_local_heads: int  # key/value heads (GQA)
    head_dim: int
    intermediate_size: int  # SwiGLU hidden size
    rope_base: float
    norm_eps: float
    max_seq_len: int  # positions the RoPE table covers
    qk_norm: bool  # RMSNorm over each q/k head before RoPE

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("vocab_size", "dim", "n_layer", "n_head", "n_local_heads", "head_dim", "intermediate_size"):
            _positive_int(getattr(self, field), f"{name}.{field}")
        _positive_int(self.max_seq_len, f"{name}.max_seq_len")
        _positive_float(self.rope_base, f"{name}.rope_base")
        _positive_float(self.norm_eps, f"{name}.norm_eps")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"{name}.qk_norm must be a bool")
        if self.n_head % self.n_local_heads:
            raise ValueError(
                f"{name}: n_head ({self.n_head}) must be a multiple of n_local_heads ({self.n_local_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"{name}: head_dim ({self.head_dim}) must be even for RoPE")


@dataclass(frozen=True)
class SlowARConfig(_StackConfig):
    """The slow AR (``text_config``): one step per frame over the whole sequence."""

    tie_word_embeddings: bool = True  # output projection = token embeddings

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError("SlowARConfig.tie_word_embeddings must be a bool")


@dataclass(frozen=True)
class FastARConfig(_StackConfig):
    """The fast AR (``audio_decoder_config``): ``num_codebooks`` steps per frame. ``vocab_size`` = codebook size."""

    num_codebooks: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.num_codebooks, "FastARConfig.num_codebooks")
        if self.max_seq_len != self.num_codebooks:
            raise ValueError("FastARConfig.max_seq_len must equal num_codebooks (one fast position per codebook)")

    @property
    def codebook_size(self) -> int:
        return self.vocab_size


@dataclass(frozen=True)
class ModelConfig:
    slow: SlowARConfig
    fast: FastARConfig
    semantic_begin_id: int  # <|semantic:0|>; <|semantic:i|> = semantic_begin_id + i
    semantic_end_id: int  # last semantic token, inclusive
    im_end_id: int  # <|im_end|> (config.json: eos_token_id), ends a turn
    pad_token_id: int | None = None
    audio_pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("semantic_begin_id", "semantic_end_id", "im_end_id"):
            _token_id(getattr(self, name), name)
        for name in ("pad_token_id", "audio_pad_token_id"):
            if getattr(self, name) is not None:
                _token_id(getattr(self, name), name)
        vocab = self.slow.vocab_size
        if not self.semantic_begin_id <= self.semantic_end_id < vocab:
            raise ValueError(
                f"semantic token range {self.semantic_begin_id}..{self.semantic_end_id} must be ordered and within "
                f"the slow AR vocabulary ({vocab})"
            )
        if self.num_semantic_tokens != self.fast.codebook_size:
            raise ValueError(
                f"{self.num_semantic_tokens} semantic tokens but a codebook of {self.fast.codebook_size} entries: "
                "each semantic token must name one codebook entry"
            )
        if not 0 <= self.im_end_id < vocab or self.semantic_begin_id <= self.im_end_id <= self.semantic_end_id:
            raise ValueError(f"im_end_id {self.im_end_id} must be a non-semantic token of the slow AR vocabulary")
        if self.slow.dim != self.fast.dim:
            raise ValueError(
                f"slow AR dim {self.slow.dim} != fast AR dim {self.fast.dim}: a projection between the stacks is "
                "not supported"
            )

    @property
    def num_codebooks(self) -> int:
        return self.fast.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.fast.codebook_size

    @property
    def num_semantic_tokens(self) -> int:
        return self.semantic_end_id - self.semantic_begin_id + 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Parse a ``config.json`` document. ValueError names what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("config must be a JSON object")
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type is {model_type!r}, expected {MODEL_TYPE!r} (a Fish Audio S2 Pro checkpoint)")
        _require(
            data,
            ("text_config", "audio_decoder_config", "semantic_start_token_id", "semantic_end_token_id", "eos_token_id"),
            "config",
        )
        text, audio = data["text_config"], data["audio_decoder_config"]
        for name, section in (("text_config", text), ("audio_decoder_config", audio)):
            if not isinstance(section, Mapping):
                raise ValueError(f"{name} must be a JSON object")
            _check_supported(section, name)
        slow = _slow_from_dict(text)
        return cls(
            slow=slow,
            fast=_fast_from_dict(audio, slow),
            semantic_begin_id=data["semantic_start_token_id"],
            semantic_end_id=data["semantic_end_token_id"],
            im_end_id=data["eos_token_id"],
            pad_token_id=data.get("pad_token_id"),
            audio_pad_token_id=data.get("audio_pad_token_id"),
        )


def _require(section: Mapping[str, Any], names: tuple[str, ...], where: str) -> None:
    missing = [name for name in names if section.get(name) is None]
    if missing:
        raise ValueError(f"{where} is missing required field(s): {', '.join(missing)}")


def _check_supported(section: Mapping[str, Any], where: str) -> None:
    for flag in ("attention_qkv_bias", "attention_o_bias", "use_moe"):
        if section.get(flag):
            raise ValueError(f"{where}.{flag} is true: not supported by this engine")


def _slow_from_dict(tc: Mapping[str, Any]) -> SlowARConfig:
    _require(tc, ("vocab_size", "dim", "n_layer", "n_head", "intermediate_size"), "text_config")
    n_head, dim = _positive_int(tc["n_head"], "text_config.n_head"), _positive_int(tc["dim"], "text_config.dim")
    return SlowARConfig(
        vocab_size=tc["vocab_size"],
        dim=dim,
        n_layer=tc["n_layer"],
        n_head=n_head,
        n_local_heads=_default(tc.get("n_local_heads"), n_head),
        head_dim=_default(tc.get("head_dim"), dim // n_head),
        intermediate_size=tc["intermediate_size"],
        rope_base=tc.get("rope_base", 10000),
        norm_eps=tc.get("norm_eps", 1e-5),
        max_seq_len=tc.get("max_seq_len", 2048),
        qk_norm=tc.get("attention_qk_norm", False),
        tie_word_embeddings=tc.get("tie_word_embeddings", True),
    )


def _fast_from_dict(adc: Mapping[str, Any], slow: SlowARConfig) -> FastARConfig:
    _require(adc, ("vocab_size", "num_codebooks", "n_layer"), "audio_decoder_config")
    num_codebooks = _positive_int(adc["num_codebooks"], "audio_decoder_config.num_codebooks")
    return FastARConfig(
        vocab_size=adc["vocab_size"],
        dim=_default(adc.get("dim"), slow.dim),
        n_layer=adc["n_layer"],
        n_head=_default(adc.get("n_head"), slow.n_head),
        n_local_heads=_default(adc.get("n_local_heads"), slow.n_local_heads),
        head_dim=_default(adc.get("head_dim"), slow.head_dim),
        intermediate_size=_default(adc.get("intermediate_size"), slow.intermediate_size),
        rope_base=slow.rope_base,
        norm_eps=slow.norm_eps,
        max_seq_len=num_codebooks,
        qk_norm=_default(adc.get("attention_qk_norm"), slow.qk_norm),
        num_codebooks=num_codebooks,
    )


def _default(value: Any, fallback: Any) -> Any:
    """The reference's ``x or default`` for optional fields (None and -1 mean unset)."""
    return (
        fallback if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1) else value
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read model config {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return ModelConfig.from_dict(data)
