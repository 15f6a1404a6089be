"""Model size presets with random weights, for benchmarks and tests that need shapes, not voices.

``tiny`` is the fixture's configuration, ``small`` a CPU-sized model with the real vocabulary layout
(4096 semantic tokens), ``s2pro`` the real S2 Pro shapes (4.1 B + 0.42 B parameters: bfloat16 on a GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.dualar.config import ModelConfig
from engine.dualar.model import DualAR

__all__ = ["PRESETS", "SPECIAL_TOKENS", "byte_level_tokenizer", "preset_config", "random_codec", "random_model"]

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
    "<|phoneme_start|>",
    "<|phoneme_end|>",
    "<|text|>",
    "<|voice|>",
    "<|interleave|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
)

_SPECIALS = 12  # <|endoftext|> .. <|audio_pad|> after the 256 byte tokens, as in the fixture's tokenizer


def _stack(dim: int, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int, vocab: int, **kw: Any) -> dict:
    return {
        "dim": dim,
        "n_layer": layers,
        "n_head": heads,
        "n_local_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "rope_base": 1_000_000,
        "norm_eps": 1e-6,
        "attention_qkv_bias": False,
        "attention_o_bias": False,
        "use_moe": False,
        "dropout": 0.0,
        **kw,
    }


def _config(slow: dict, fast: dict, semantic: int, max_seq_len: int) -> dict:
    begin = 256 + _SPECIALS
    slow = {**slow, "model_type": "fish_qwen3", "attention_qk_norm": True, "tie_word_embeddings": True,
            "max_seq_len": max_seq_len}
    fast = {**fast, "model_type": "fish_qwen3_audio_decoder", "attention_qk_norm": False,
            "tie_word_embeddings": False, "num_codebooks": 10, "max_seq_len": 11, "text_dim": slow["dim"]}
    return {
        "model_type": "fish_qwen3_omni",
        "text_config": slow,
        "audio_decoder_config": fast,
        "semantic_start_token_id": begin,
        "semantic_end_token_id": begin + semantic - 1,
        "eos_token_id": 258,
        "pad_token_id": 259,
        "audio_pad_token_id": 267,
    }


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


PRESETS: dict[str, dict] = {
    "tiny": _config(
        _stack(64, 2, 4, 2, 16, 192, _pad8(256 + _SPECIALS + 64)), _stack(64, 1, 4, 2, 16, 192, 64), 64, 4096
    ),
    "small": _config(
        _stack(512, 8, 8, 2, 64, 1536, _pad8(256 + _SPECIALS + 4096)), _stack(512, 2, 8, 2, 64, 1536, 4096), 4096, 8192
    ),
    "s2pro": _config(
        _stack(2560, 36, 32, 8, 128, 9728, 155776), _stack(2560, 4, 32, 8, 128, 9728, 4096), 4096, 32768
    ),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig.from_dict(PRESETS[name])


@torch.no_grad()
def random_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> DualAR:
    """A model of the preset's shapes with random weights (normal, std 0.02; norms at 1), in eval mode."""
    config = preset_config(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DualAR(config)
    model = model.to_empty(device=device).to(dtype)
    for pname, param in model.named_parameters():
        if pname.endswith("norm.weight") or pname.endswith("_norm.weight"):
            param.fill_(1.0)
        else:
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.02
            param.copy_(values.to(dtype))
    model.init_buffers()
    return model.requires_grad_(False).eval()


def _bytes_to_unicode() -> dict[int, str]:
    # the byte-level BPE alphabet: printable bytes stand for themselves, the rest are shifted past 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def byte_level_tokenizer(num_semantic: int):  # -> tokenizers.Tokenizer
    """Bytes 0..255 as ids 0..255, the 12 specials from 256, ``<|semantic:i|>`` = 268 + i (the fixture's layout)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS, *(f"<|semantic:{i}|>" for i in range(num_semantic))]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return tokenizer


def random_codec(name: str, *, device: str = "cpu", seed: int = 0):  # -> engine.dualar.codec.Codec
    """The codec that goes with a model preset (tiny = the fixture's shapes, small = CPU-sized, s2pro = the real
    one), random weights, float32; the global RNG is left untouched."""
    from engine.dualar.codec import Codec, CodecConfig, ModifiedDAC

    configs = {"tiny": CodecConfig.tiny, "small": CodecConfig.small, "s2pro": CodecConfig.s2pro}
    if name not in configs:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(configs)})")
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        with dev:
            model = ModifiedDAC(configs[name]())
    return Codec(model.eval().requires_grad_(False))
