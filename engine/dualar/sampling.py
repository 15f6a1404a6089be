"""Token sampling for the dual AR, shared by every backend.

Order, as the reference: top-p on the untempered distribution (a token is dropped once the cumulative probability
up to and including it exceeds top_p; the most likely token always stays), then top-k, then temperature, then one
draw. Temperature 0 is greedy argmax. ``top_k`` 0 and ``top_p`` 1 switch those filters off.

The main token (slow AR) may only be a semantic token or ``<|im_end|>``. Repetition-aware sampling (RAS): when
the drawn main token is semantic and occurs among the last 10 main tokens of its sequence, it is replaced by a draw
at temperature 1.0 / top_p 0.9 (same top_k). RAS applies at every temperature, greedy included, as in the
reference. Both draws are always made, so a seeded generator gives the same stream whether or not RAS fires.
Residual codes (fast AR) use the request's temperature / top-p / top-k with no mask and no RAS.

Everything is batched: logits are (B, V) and each row has its own parameters; no step synchronizes with the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from engine.base import Sampling

__all__ = [
    "RAS_TEMPERATURE",
    "RAS_TOP_P",
    "RAS_WINDOW",
    "Sampler",
    "SamplingParams",
    "logits_to_probs",
    "main_token_ids",
    "sample",
]

RAS_WINDOW = 10  # main tokens remembered per sequence
RAS_TEMPERATURE = 1.0
RAS_TOP_P = 0.9
_MIN_TEMPERATURE = 1e-5  # the reference's clip; rows at 0 are taken greedily instead


class SamplingParams(NamedTuple):
    temperature: Tensor  # (B,) float32
    top_p: Tensor  # (B,) float32
    top_k: Tensor  # (B,) int64; 0 = off

    @classmethod
    def of(cls, sampling: Sampling | Sequence[Sampling], device: torch.device | str = "cpu") -> SamplingParams:
        rows = [sampling] if isinstance(sampling, Sampling) else list(sampling)
        return cls(
            torch.tensor([s.temperature for s in rows], dtype=torch.float32, device=device),
            torch.tensor([s.top_p for s in rows], dtype=torch.float32, device=device),
            torch.tensor([s.top_k for s in rows], dtype=torch.long, device=device),
        )

    def with_temperature_top_p(self, temperature: float, top_p: float) -> SamplingParams:
        return SamplingParams(
            torch.full_like(self.temperature, temperature), torch.full_like(self.top_p, top_p), self.top_k
        )


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    # logits: (B, V) -> probs (B, V) float32 after top-p, top-k and temperature
    logits = logits.float()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    top_k = torch.where(params.top_k > 0, params.top_k, logits.shape[-1])
    drop = ((cumulative > params.top_p[:, None]) & (params.top_p[:, None] < 1.0)) | (rank >= top_k[:, None])
    drop[:, 0] = False
    drop = drop.scatter(-1, order, drop)  # back to vocabulary order
    logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits / params.temperature.clamp(min=_MIN_TEMPERATURE)[:, None], dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    # logits: (B, V) -> (B,) int64 indices into V
    probs = logits_to_probs(logits, params)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-20)
    drawn = torch.argmax(probs / race, dim=-1)  # an exact draw from probs (exponential race)
    return torch.where(params.temperature == 0, torch.argmax(logits, dim=-1), drawn)


def main_token_ids(
    semantic_begin_id: int, semantic_end_id: int, im_end_id: int, device: torch.device | str = "cpu"
) -> Tensor:
    """(M,) the token ids the main token may take, ascending: the semantic range and ``<|im_end|>``."""
    ids = torch.cat([torch.arange(semantic_begin_id, semantic_end_id + 1), torch.tensor([im_end_id])])
    return torch.unique(ids).to(device)


class Sampler:
    """Sampling state of a batch of sequences: parameters, the allowed main tokens, the RAS window, the RNG."""

    def __init__(
        self,
        sampling: Sampling | Sequence[Sampling],
        *,
        main_ids: Tensor,
        semantic_range: tuple[int, int],
        generator: torch.Generator | None = None,
    ):
        device = main_ids.device
        self.params = SamplingParams.of(sampling, device)
        self.ras_params = self.params.with_temperature_top_p(RAS_TEMPERATURE, RAS_TOP_P)
        self.main_ids = main_ids  # (M,)
        self.semantic_begin_id, self.semantic_end_id = semantic_range
        self.generator = generator
        self.window = torch.full((len(self.params.temperature), RAS_WINDOW), -1, dtype=torch.long, device=device)

    def main(self, logits: Tensor) -> Tensor:
        # logits: (B, V) slow AR -> (B,) main token ids; remembers them for RAS
        allowed = logits[:, self.main_ids]  # (B, M): the mask, by gathering only what may be drawn
        normal = self.main_ids[sample(allowed, self.params, self.generator)]
        fallback = self.main_ids[sample(allowed, self.ras_params, self.generator)]
        semantic = (normal >= self.semantic_begin_id) & (normal <= self.semantic_end_id)
        repeated = (self.window == normal[:, None]).any(dim=-1) & semantic
        token = torch.where(repeated, fallback, normal)
        self.window = torch.cat([self.window[:, 1:], token[:, None]], dim=1)
        return token

    def residual(self, logits: Tensor) -> Tensor:
        # logits: (B, codebook size) fast AR -> (B,) codes
        return sample(logits, self.params, self.generator)
