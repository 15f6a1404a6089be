"""What a random-weight S2 Pro needs besides weights: its config, a tokenizer and a codec (benchmarks, GPU tests).

The model presets are ``engine.dualar.presets`` (``tiny``, ``small``, ``s2pro`` = the real shapes); SGLang fills their
weights itself (``load_format="dummy"``). The tokenizer is byte level with the special tokens at the ids the presets
use (bytes 0..255, then ``<|endoftext|>`` .. ``<|audio_pad|>``, then ``<|semantic:i|>``), like the fixture's.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.dualar.presets import PRESETS, SPECIAL_TOKENS, byte_level_tokenizer, preset_config

__all__ = ["SPECIAL_TOKENS", "byte_level_tokenizer", "preset_raw_config", "random_codec"]

def preset_raw_config(name: str) -> dict[str, Any]:
    """The ``config.json`` document of a preset (ValueError for an unknown name)."""
    preset_config(name)  # validates the name and the config
    return dict(PRESETS[name])


def random_codec(device: str | torch.device = "cpu", *, seed: int = 0):  # -> engine.dualar.codec.Codec
    """The real codec's shapes (``CodecConfig.s2pro()``) with random weights, in float32."""
    from engine.dualar.codec import Codec, CodecConfig, ModifiedDAC

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):  # global RNG untouched
        torch.manual_seed(seed)
        with device:
            model = ModifiedDAC(CodecConfig.s2pro())
    return Codec(model.eval().requires_grad_(False))
