"""Per-request sampling for the SGLang backend, batched and CUDA-graph safe.

The rules are the shared ones (``engine.dualar.sampling``): top-p on the untempered distribution, then top-k, then
temperature (0 = greedy); the main token restricted to the semantic range plus ``<|im_end|>``; repetition-aware
sampling (RAS) redraws a semantic main token that occurs among the last 10 main tokens at temperature 1.0 /
top-p 0.9; residual codes use the request's settings without RAS. ``logits_to_probs`` is reused as is.

What differs is the randomness. A decode step here is one captured CUDA graph over every running request, so a
per-request ``torch.Generator`` cannot be used. Each draw is an exponential race (``argmax(p / E)``, an exact draw
from ``p``) whose noise ``E = -log(U)`` comes from a counter-based hash of (request seed, frame index, stream,
vocabulary index): pure integer tensor ops, no RNG state, and the same request with the same seed gives the same
frames whatever else is in the batch. Streams: 0 the main draw, 1 the RAS redraw, 1 + k residual level k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from engine.dualar.sampling import RAS_TEMPERATURE, RAS_TOP_P, SamplingParams, logits_to_probs

__all__ = ["MainDraw", "counter_uniform", "draw_main", "draw_residual", "sample_with_noise"]

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: (x < 2**32) * _MUL stays below 2**59, no int64 overflow
STREAM_MAIN, STREAM_RAS = 0, 1


def _mix32(x: Tensor) -> Tensor:
    # x: int64 values in [0, 2**32) -> the same, well mixed (two multiply-xorshift rounds)
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def counter_uniform(seed: Tensor, step: Tensor, stream: int, n: int) -> Tensor:
    """(R,) int64 seeds and frame indices -> (R, n) float32 uniforms in (0, 1), a pure function of its inputs."""
    h = _mix32((seed & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (step & _M32))
    h = _mix32(h ^ (stream * 0x85EBCA6B & _M32))  # (R,)
    index = torch.arange(n, device=seed.device, dtype=torch.int64)
    h = _mix32(_mix32(h[:, None] ^ index[None, :]) ^ 0x27D4EB2F)  # (R, n)
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample_with_noise(logits: Tensor, params: SamplingParams, noise: Tensor) -> Tensor:
    # logits, noise: (R, V) -> (R,) int64; noise is Exp(1) (``-log(U)``)
    probs = logits_to_probs(logits, params)
    drawn = torch.argmax(probs / noise, dim=-1)
    return torch.where(params.temperature == 0, torch.argmax(logits, dim=-1), drawn)


def _exponential(seed: Tensor, step: Tensor, stream: int, n: int) -> Tensor:
    return -torch.log(counter_uniform(seed, step, stream, n))


class MainDraw(NamedTuple):
    token: Tensor  # (R,) int64 main token ids
    window: Tensor  # (R, RAS window) the updated window of recent main tokens
    ras: Tensor  # (R,) bool: RAS replaced the first draw


def draw_main(
    allowed: Tensor,
    main_ids: Tensor,
    params: SamplingParams,
    window: Tensor,
    *,
    seed: Tensor,
    step: Tensor,
    semantic_range: tuple[int, int],
    allow_end: Tensor,
    end_column: int,
) -> MainDraw:
    """The main token of each row. ``allowed`` (R, M): logits of ``main_ids`` (M,); ``window`` (R, W) the last W
    main tokens (-1 = none); ``allow_end`` (R,) bool: False masks ``<|im_end|>`` (column ``end_column``)."""
    m = allowed.shape[-1]
    column = torch.arange(m, device=allowed.device)
    allowed = allowed.masked_fill((column == end_column)[None, :] & ~allow_end[:, None], float("-inf"))
    ras_params = SamplingParams(
        torch.full_like(params.temperature, RAS_TEMPERATURE), torch.full_like(params.top_p, RAS_TOP_P), params.top_k
    )
    normal = main_ids[sample_with_noise(allowed, params, _exponential(seed, step, STREAM_MAIN, m))]
    fallback = main_ids[sample_with_noise(allowed, ras_params, _exponential(seed, step, STREAM_RAS, m))]
    begin, end = semantic_range
    semantic = (normal >= begin) & (normal <= end)
    repeated = (window == normal[:, None]).any(dim=-1) & semantic
    token = torch.where(repeated, fallback, normal)
    return MainDraw(token, torch.cat([window[:, 1:], token[:, None]], dim=1), repeated)


def draw_residual(logits: Tensor, params: SamplingParams, *, seed: Tensor, step: Tensor, level: int) -> Tensor:
    """Residual code ``level`` (1..C-1) of each row from the fast AR's (R, codebook size) logits."""
    return sample_with_noise(logits, params, _exponential(seed, step, STREAM_RAS + level, logits.shape[-1]))
