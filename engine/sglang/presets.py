"""What a random-weight S2 Pro needs besides weights: its config, a tokenizer and a codec (benchmarks, GPU tests).

The model presets are ``engine.dualar.presets`` (``tiny``, ``small``, ``s2pro`` = the real shapes); SGLang fills their
weights itself (``load_format="dummy"``). The tokenizer is byte level with the special tokens at the ids the presets
use (bytes 0..255, then ``<|endoftext|>`` .. ``<|audio_pad|>``, then ``<|semantic:i|>``), like the fixture's.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engine.dualar.presets import PRESETS, preset_config

__all__ = ["SPECIAL_TOKENS", "byte_level_tokenizer", "preset_raw_config", "random_codec"]

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


def preset_raw_config(name: str) -> dict[str, Any]:
    """The ``config.json`` document of a preset (ValueError for an unknown name)."""
    preset_config(name)  # validates the name and the config
    return dict(PRESETS[name])


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


def byte_level_tokenizer(num_semantic: int) -> Tokenizer:
    """Bytes 0..255 as ids 0..255, the 12 specials from 256, ``<|semantic:i|>`` = 268 + i."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS, *(f"<|semantic:{i}|>" for i in range(num_semantic))]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return tokenizer


def random_codec(device: str | torch.device = "cpu", *, seed: int = 0):  # -> engine.dualar.codec.Codec
    """The real codec's shapes (``CodecConfig.s2pro()``) with random weights, in float32."""
    from engine.dualar.codec import Codec, CodecConfig, ModifiedDAC

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):  # global RNG untouched
        torch.manual_seed(seed)
        with device:
            model = ModifiedDAC(CodecConfig.s2pro())
    return Codec(model.eval().requires_grad_(False))
